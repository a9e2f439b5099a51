// Enterprise view: a site's load curve, daily carbon and the yearly carbon account with its grade.
import {
  ApiError,
  addDays,
  api,
  apiList,
  cell,
  dayIn,
  fillSelect,
  fmt,
  fmtDay,
  fmtTime,
  headedRow,
  readParams,
  setState,
  setupKey,
  showError,
  startOfDay,
  writeParams,
  zoneLabel,
} from "./api.js";
import { COLORS, seconds, timeChart } from "./charts.js";

const DEFAULT_ZONE = "Asia/Shanghai"; // the contract's default for calendar intervals
const DEFAULT_DAYS = 7;

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const tenants = new Map();
let zone = DEFAULT_ZONE;
let session = null;
let siteZones = new Map();

async function main() {
  $("zone").textContent = zoneLabel(zone);
  await setupKey();
  const charts = {
    load: timeChart($("load"), {
      // The peak first and dashed, so the average is drawn over it where they coincide (15 minutes).
      series: [
        { label: "Peak", color: COLORS.peak, unit: "kW", width: 1.5, dash: [6, 4] },
        { label: "Average", color: COLORS.load, unit: "kW" },
      ],
      zone: () => zone,
      unit: "kW",
    }),
    carbon: timeChart($("carbon"), {
      series: [
        { label: "Total", color: COLORS.carbon, unit: "kgCO₂e", bars: true },
        { label: "Market-based", color: COLORS.market, unit: "kgCO₂e", points: true },
      ],
      zone: () => zone,
      unit: "kgCO₂e",
    }),
    estimated: timeChart($("estimated"), {
      series: [{ label: "Estimated", color: COLORS.estimated, unit: "kgCO₂e", bars: true }],
      zone: () => zone,
      unit: "kgCO₂e",
    }),
  };
  $("tenant").addEventListener("change", () => chooseTenant(charts));
  $("site").addEventListener("change", () => refresh(charts, ["load", "best"]));
  $("interval").addEventListener("change", () => refresh(charts, ["load"]));
  for (const id of ["start", "end"]) {
    $(id).addEventListener("change", () => refresh(charts, ["load", "carbon", "estimated"]));
  }
  $("year").addEventListener("change", () => refresh(charts, ["account"]));
  $("controls").addEventListener("submit", (event) => event.preventDefault());
  document.addEventListener("meterflow:key-changed", () => loadTenants(charts));
  await loadTenants(charts);
}

async function loadTenants(charts) {
  const note = $("tenants-note");
  const wanted = readParams().get("tenant") || $("tenant").value;
  let options = [];
  tenants.clear();
  try {
    for (const t of await apiList("/enterprises")) {
      tenants.set(t.tenant, t);
      options.push({ value: t.tenant, label: t.name && t.name !== t.tenant ? `${t.name} (${t.tenant})` : t.tenant });
    }
    note.hidden = true;
  } catch (err) {
    note.textContent = err instanceof ApiError ? err.describe() : String(err);
    note.hidden = false;
    if (wanted) options = [{ value: wanted, label: wanted }];
  }
  fillSelect($("tenant"), options, wanted);
  if (options.length === 0) {
    for (const id of ["load", "carbon", "estimated", "account"]) {
      setState($(id), "empty", "No enterprise is visible to this key.");
    }
    return;
  }
  await chooseTenant(charts, readParams());
}

async function chooseTenant(charts, params = new URLSearchParams()) {
  const tenant = $("tenant").value;
  zone = tenants.get(tenant)?.timezone || DEFAULT_ZONE;
  $("zone").textContent = zoneLabel(zone);
  const today = dayIn(new Date(), zone);
  const valid = (day) => /^\d{4}-\d{2}-\d{2}$/.test(day || "");
  $("end").value = valid(params.get("end")) ? params.get("end") : today;
  $("start").value = valid(params.get("start")) ? params.get("start") : addDays($("end").value, 1 - DEFAULT_DAYS);
  $("year").value = /^\d{4}$/.test(params.get("year") || "") ? params.get("year") : today.slice(0, 4);
  if (["15m", "1h", "1d"].includes(params.get("interval"))) $("interval").value = params.get("interval");

  const wantedSite = params.get("site");
  let sites = [];
  try {
    sites = await apiList("/sites", { tenant });
  } catch (err) {
    showError($("load"), err);
  }
  siteZones = new Map(sites.map((s) => [s.site, s.grid_zone || s.province || null]));
  fillSelect(
    $("site"),
    sites.map((s) => ({ value: s.site, label: s.name && s.name !== s.site ? `${s.name} (${s.site})` : s.site })),
    wantedSite,
  );
  await refresh(charts, ["load", "carbon", "estimated", "account"]);
}

async function refresh(charts, parts) {
  session?.abort();
  session = new AbortController();
  const { signal } = session;
  const tenant = $("tenant").value;
  const site = $("site").value;
  let start = $("start").value;
  let end = $("end").value;
  if (start && end && start > end) [start, end] = [end, start];
  writeParams({ tenant, site, start, end, interval: $("interval").value, year: $("year").value });
  const range = { start: startOfDay(start, zone), end: startOfDay(addDays(end, 1), zone) };
  const jobs = [];
  if (parts.includes("load")) jobs.push(load(charts.load, tenant, site, range, signal));
  if (parts.includes("carbon")) jobs.push(carbon(charts.carbon, tenant, range, signal));
  if (parts.includes("estimated")) jobs.push(estimated(charts.estimated, tenant, range, signal));
  if (parts.includes("estimated") || parts.includes("best")) jobs.push(cleanestWindow(signal));
  if (parts.includes("account")) jobs.push(account(tenant, $("year").value, signal));
  await Promise.all(jobs);
}

async function load(chart, tenant, site, range, signal) {
  const panel = $("load");
  if (!site) {
    chart.setData([], [], []);
    setState(panel, "empty", "This enterprise has no site.");
    return;
  }
  setState(panel, "loading");
  $("load-site").textContent = `· ${site}`;
  try {
    const body = await api(
      `/sites/${enc(site)}/load`,
      { tenant, ...range, interval: $("interval").value },
      { signal },
    );
    const points = body.points || [];
    chart.setRange(seconds(range.start), seconds(range.end));
    chart.setData(
      points.map((p) => seconds(p.ts)),
      points.map((p) => p.peak_kw),
      points.map((p) => p.avg_kw),
    );
    const energy = points.reduce((sum, p) => sum + (p.energy_kwh ?? 0), 0);
    const avgs = points.map((p) => p.avg_kw).filter(Number.isFinite);
    const peaks = points.map((p) => p.peak_kw).filter(Number.isFinite);
    $("load-energy").textContent = points.length ? fmt.kwh(energy) : "–";
    $("load-avg").textContent = avgs.length ? fmt.kw(avgs.reduce((a, b) => a + b, 0) / avgs.length) : "–";
    $("load-peak").textContent = peaks.length ? fmt.kw(Math.max(...peaks)) : "–";
    $("load-quality").textContent = quality(points);
    panel.dataset.energyKwh = String(energy);
    if (points.length) setState(panel, "ready");
    else setState(panel, "empty", "No load was recorded for this site in the chosen days.");
  } catch (err) {
    showError(panel, err);
  }
}

/** Share of intervals measured rather than estimated or substituted. */
function quality(points) {
  const known = points.filter((p) => p.quality !== undefined && p.quality !== null);
  if (!known.length) return "–";
  if (known.every((p) => typeof p.quality === "number")) {
    return `${fmt.plain((100 * known.reduce((a, p) => a + p.quality, 0)) / known.length, 1)} %`;
  }
  const measured = known.filter((p) => p.quality === "measured").length;
  return `${fmt.count(measured)} of ${fmt.count(known.length)} intervals`;
}

async function carbon(chart, tenant, range, signal) {
  const panel = $("carbon");
  setState(panel, "loading");
  chart.setRange(seconds(range.start), seconds(range.end));
  try {
    const body = await api(`/enterprises/${enc(tenant)}/carbon`, { ...range, interval: "1d" }, { signal });
    const points = body.points || [];
    const market = (p) =>
      Number.isFinite(p.co2e_market_kg)
        ? p.co2e_market_kg
        : Number.isFinite(p.scope1_kg) && Number.isFinite(p.scope2_market_kg)
          ? p.scope1_kg + p.scope2_market_kg
          : null;
    // Each bar stands over the middle of its local day, not astride two days.
    chart.setData(
      points.map((p) => seconds(p.ts) + 43_200),
      points.map((p) => p.co2e_kg),
      points.map(market),
    );
    const tbody = panel.querySelector("table.data tbody");
    tbody.replaceChildren();
    for (const p of points) {
      const tr = headedRow(tbody, fmtDay(p.ts, zone));
      cell(tr, fmt.co2(p.co2e_kg), "num");
      cell(tr, fmt.co2(p.scope1_kg), "num");
      cell(tr, fmt.co2(p.scope2_location_kg), "num");
      cell(tr, fmt.co2(p.scope2_market_kg), "num");
    }
    if (points.length) setState(panel, "ready");
    else setState(panel, "empty", "No emissions were recorded for this enterprise in the chosen days.");
  } catch (err) {
    showError(panel, err);
  }
}

async function estimated(chart, tenant, range, signal) {
  const panel = $("estimated");
  setState(panel, "loading");
  chart.setRange(seconds(range.start), seconds(range.end));
  try {
    const body = await api(`/enterprises/${enc(tenant)}/carbon/estimated`, { ...range, interval: "1h" }, { signal });
    const points = body.points || [];
    chart.setData(
      points.map((p) => seconds(p.ts) + 1_800),
      points.map((p) => (p.covered_kwh > 0 ? p.co2e_kg : null)),
    );
    const sum = (name) => points.reduce((total, p) => total + (p[name] ?? 0), 0);
    const covered = sum("covered_kwh");
    $("est-total").textContent = covered > 0 ? fmt.co2(sum("co2e_kg")) : "–";
    $("est-mean").textContent = covered > 0 ? `${fmt.plain((1000 * sum("co2e_kg")) / covered, 0)} g/kWh` : "–";
    $("est-uncovered").textContent = fmt.kwh(sum("uncovered_kwh"));
    if (covered > 0) setState(panel, "ready");
    else setState(panel, "empty", "No grid intensity covers this enterprise's sites in the chosen days.");
  } catch (err) {
    showError(panel, err);
  }
}

/** The cleanest two hours of the next 24 h in the selected site's grid zone, for shiftable loads. A
 * failure here is this card's alone: the estimate beside it stands. */
async function cleanestWindow(signal) {
  const gridZone = siteZones.get($("site").value);
  $("est-best-zone").textContent = gridZone ? `zone ${gridZone}` : "the site has no grid zone";
  $("est-best").textContent = "–";
  if (!gridZone) return;
  const now = new Date();
  try {
    const best = await api(
      `/grid-intensity/${enc(gridZone)}/best-window`,
      { start: now.toISOString(), end: new Date(now.getTime() + 86_400_000).toISOString(), window_minutes: 120 },
      { signal },
    );
    $("est-best").textContent = best.start
      ? `${fmtTime(best.start, zone)} · ${fmt.plain(best.mean_g_co2e_per_kwh, 0)} g/kWh`
      : "no intensity yet";
  } catch (err) {
    if (err?.name === "AbortError") return;
    $("est-best").textContent = "not available";
    $("est-best-zone").textContent = err instanceof ApiError ? err.describe() : String(err);
  }
}

async function account(tenant, year, signal) {
  const panel = $("account");
  setState(panel, "loading");
  $("account-year").textContent = `· ${year}`;
  try {
    const acc = await api(`/enterprises/${enc(tenant)}/carbon-account`, { year }, { signal });
    $("acc-scope1").textContent = fmt.co2(acc.scope1_kg);
    $("acc-scope2-location").textContent = fmt.co2(acc.scope2_location_kg);
    $("acc-scope2-market").textContent = fmt.co2(acc.scope2_market_kg);
    const [value, note] = intensity(acc.intensity, acc.intensity_unit);
    $("acc-intensity").textContent = value;
    $("acc-intensity-note").textContent = note;
    const grade = acc.grade;
    // A scheme may place the enterprise in a level yet refuse a grade (too few peers in its industry).
    $("acc-grade").textContent = grade?.label || "Not graded";
    $("acc-grade-scheme").textContent = grade
      ? [grade.scheme_name || grade.scheme, grade.level ? `level ${grade.level}` : "", grade.refused || ""]
          .filter(Boolean)
          .join(" · ")
      : "Grading needs the year's value added (submit it as an output value).";
    panel.dataset.grade = grade?.label || "";
    setState(panel, "ready");
  } catch (err) {
    showError(panel, err);
  }
}

/** [figure, note]: tCO2 per 10,000 CNY of value added, the carbon-efficiency schemes' metric. */
function intensity(value, unit) {
  if (typeof value === "number") return [fmt.plain(value, 3), unit || "tCO₂ per 10,000 CNY of value added"];
  return ["–", "no value added submitted for this year"];
}

main().catch((err) => {
  const note = $("tenants-note");
  note.textContent = `The page could not start: ${err.message || err}`;
  note.hidden = false;
});
