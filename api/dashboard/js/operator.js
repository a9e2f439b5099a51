// Operator view: a VPP's flexibility now, live (SSE over fetch, else polling), per node and stale devices.
import {
  ApiError,
  api,
  apiList,
  apiUrl,
  authHeaders,
  browserZone,
  cell,
  fillSelect,
  fmt,
  fmtTime,
  headedRow,
  problemOf,
  readParams,
  setState,
  setupKey,
  showError,
  writeParams,
  zoneLabel,
} from "./api.js";
import { COLORS, seconds, timeChart } from "./charts.js";

const POLL_MS = 2000;
const WINDOW_S = 3600;
const TABLES_MS = 30_000;

const $ = (id) => document.getElementById(id);
const zone = browserZone;
const enc = encodeURIComponent;
// One AbortController per chosen VPP: changing the choice cancels its requests, stream and timers.
let session = null;

async function main() {
  $("zone").textContent = zoneLabel(zone);
  const wanted = readParams();
  if (["15", "30", "60"].includes(wanted.get("duration"))) $("duration").value = wanted.get("duration");
  await setupKey();
  const chart = timeChart($("live"), {
    series: [
      { label: "Up", color: COLORS.up, unit: "kW" },
      { label: "Down", color: COLORS.down, unit: "kW" },
    ],
    zone,
    unit: "kW",
    windowSeconds: WINDOW_S,
    spanGaps: true,
  });
  $("vpp").addEventListener("change", () => show(chart));
  $("duration").addEventListener("change", () => show(chart));
  document.addEventListener("meterflow:key-changed", () => loadVpps(chart));
  await loadVpps(chart);
}

async function loadVpps(chart) {
  const note = $("vpps-note");
  const wanted = readParams().get("vpp") || $("vpp").value;
  let options = [];
  try {
    const vpps = await apiList("/vpps");
    options = vpps.map((v) => ({
      value: v.vpp,
      label: Number.isFinite(v.resources) ? `${v.vpp} (${fmt.count(v.resources)} resources)` : v.vpp,
    }));
    note.hidden = true;
  } catch (err) {
    note.textContent = err instanceof ApiError ? err.describe() : String(err);
    note.hidden = false;
    // Without the list a VPP named in the address can still be shown.
    if (wanted) options = [{ value: wanted, label: wanted }];
  }
  fillSelect($("vpp"), options, wanted);
  if (options.length === 0) {
    session?.abort();
    for (const id of ["capacity", "live", "nodes", "stale-devices"]) {
      setState($(id), "empty", note.hidden ? "No VPP is visible to this key." : "Choose a VPP once the list is available.");
    }
    if (note.hidden) {
      note.textContent = "No VPP is visible to this key.";
      note.hidden = false;
    }
    return;
  }
  show(chart);
}

function show(chart) {
  session?.abort();
  session = new AbortController();
  const { signal } = session;
  const vpp = $("vpp").value;
  const duration = $("duration").value;
  writeParams({ vpp, duration });
  for (const id of ["capacity", "live", "nodes", "stale-devices"]) setState($(id), "loading");
  $("live").dataset.updates = "0";
  chart.setData([], [], []);
  capacityNow(vpp, duration, chart, signal);
  history(vpp, duration, chart, signal).then(() => live(vpp, duration, chart, signal));
  tables(vpp, duration, signal);
  const timer = setInterval(() => tables(vpp, duration, signal), TABLES_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}

async function capacityNow(vpp, duration, chart, signal) {
  try {
    onCapacity(await api(`/vpps/${enc(vpp)}/capacity`, { duration_min: duration }, { signal }), chart);
  } catch (err) {
    showError($("capacity"), err);
  }
}

function onCapacity(c, chart) {
  $("up-kw").textContent = fmt.kw(c.up_kw);
  $("down-kw").textContent = fmt.kw(c.down_kw);
  $("nameplate-up").textContent = fmt.kw(c.nameplate_up_kw);
  $("nameplate-down").textContent = fmt.kw(c.nameplate_down_kw);
  $("online").textContent = fmt.count(c.devices_online);
  $("stale").textContent = fmt.count(c.devices_stale);
  $("capacity-asof").textContent = c.as_of ? `as of ${fmtTime(c.as_of, zone, { seconds: true })}` : "";
  const panel = $("capacity");
  panel.dataset.upKw = String(c.up_kw);
  panel.dataset.downKw = String(c.down_kw);
  setState(panel, "ready");
  chart.append(c.as_of ? seconds(c.as_of) : Date.now() / 1000, c.up_kw, c.down_kw);
  const live = $("live");
  live.dataset.updates = String(Number(live.dataset.updates || 0) + 1);
  setState(live, "ready");
}

async function history(vpp, duration, chart, signal) {
  const end = new Date();
  const start = new Date(end.getTime() - WINDOW_S * 1000);
  const live = $("live");
  try {
    const body = await api(
      `/vpps/${enc(vpp)}/capacity/history`,
      { start: start.toISOString(), end: end.toISOString(), interval: "1m", duration_min: duration },
      { signal },
    );
    const points = body.points || [];
    chart.setData(
      points.map((p) => seconds(p.ts)),
      points.map((p) => p.up_kw),
      points.map((p) => p.down_kw),
    );
    if (points.length) setState(live, "ready");
    else setState(live, "empty", "No capacity history in the last hour yet; the chart fills as updates arrive.");
  } catch (err) {
    if (err.name === "AbortError") return;
    const why = err instanceof ApiError ? err.describe() : String(err);
    setState(live, "empty", `${why} The chart fills as live updates arrive.`);
  }
}

/** Server-sent events read with fetch (EventSource cannot send the Authorization header). */
async function live(vpp, duration, chart, signal) {
  if (signal.aborted) return;
  const url = apiUrl(`/vpps/${enc(vpp)}/capacity/stream`, { duration_min: duration });
  let events = 0;
  let reason;
  try {
    const response = await fetch(url, { headers: { ...authHeaders(), Accept: "text/event-stream" }, signal });
    if (!response.ok) throw await problemOf(response, url.pathname);
    if (!response.body) throw new Error("this browser cannot read a response as a stream");
    liveMode("stream", "streaming");
    await readEvents(response.body, (c) => {
      events += 1;
      onCapacity(c, chart);
    });
    reason = "stream: ended";
  } catch (err) {
    if (signal.aborted) return;
    reason = err instanceof ApiError ? `stream: ${err.status} ${err.title}` : `stream: ${err.message || err}`;
  }
  if (signal.aborted) return;
  if (events > 0 && reason === "stream: ended") {
    // A stream that worked and was closed (a server restart, an idle proxy): open it again.
    setTimeout(() => live(vpp, duration, chart, signal), POLL_MS);
  } else {
    poll(vpp, duration, chart, signal, reason);
  }
}

async function readEvents(body, onData) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // Events end with a blank line; lines may end in CRLF, LF or CR (the SSE grammar allows all three).
    buffer = buffer.replace(/\r\n|\r(?!$)/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onData(JSON.parse(data));
    }
  }
}

function poll(vpp, duration, chart, signal, reason) {
  liveMode("poll", `polling every ${POLL_MS / 1000} s (${reason})`);
  let timer = null;
  const tick = async () => {
    try {
      onCapacity(await api(`/vpps/${enc(vpp)}/capacity`, { duration_min: duration }, { signal }), chart);
    } catch (err) {
      if (err.name === "AbortError") return;
      showError($("capacity"), err);
      if (err instanceof ApiError && err.unavailable) {
        // The route is not there: asking every 2 s would only repeat the 404.
        setState($("live"), "unavailable", err.describe());
        liveMode("off", "not available");
        return;
      }
    }
    if (!signal.aborted) timer = setTimeout(tick, POLL_MS);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  timer = setTimeout(tick, POLL_MS);
}

function liveMode(mode, text) {
  $("live").dataset.mode = mode;
  $("live-mode").textContent = `· ${text}`;
}

async function tables(vpp, duration, signal) {
  await Promise.all([nodes(vpp, duration, signal), staleDevices(vpp, signal)]);
}

async function nodes(vpp, duration, signal) {
  const panel = $("nodes");
  try {
    const body = await api(`/vpps/${enc(vpp)}/capacity/nodes`, { duration_min: duration }, { signal });
    const rows = [...(body.nodes || [])].sort((a, b) => (b.up_kw ?? 0) - (a.up_kw ?? 0));
    const tbody = panel.querySelector("table.data tbody");
    tbody.replaceChildren();
    for (const n of rows) {
      const tr = headedRow(tbody, n.node === null ? "(smaller nodes, summed)" : n.node || "(no node)");
      cell(tr, fmt.kw(n.up_kw), "num");
      cell(tr, fmt.kw(n.down_kw), "num");
      cell(tr, fmt.count(n.devices_online), "num");
      cell(tr, fmt.count(n.devices_stale), "num");
    }
    $("nodes-asof").textContent = body.as_of ? `as of ${fmtTime(body.as_of, zone, { seconds: true })}` : "";
    panel.dataset.rows = String(rows.length);
    if (rows.length) setState(panel, "ready");
    else setState(panel, "empty", "No grid node has capacity in this VPP.");
  } catch (err) {
    showError(panel, err);
  }
}

async function staleDevices(vpp, signal) {
  const panel = $("stale-devices");
  try {
    const body = await api(`/vpps/${enc(vpp)}/stale-devices`, {}, { signal });
    const devices = body.devices || [];
    const tbody = panel.querySelector("table.data tbody");
    tbody.replaceChildren();
    for (const d of devices) {
      const tr = headedRow(tbody, d.tenant ? `${d.tenant} / ${d.device}` : d.device);
      cell(tr, d.last_seen ? fmtTime(d.last_seen, zone, { seconds: true }) : "never");
      cell(tr, interval(d.telemetry_interval_s), "num");
    }
    panel.dataset.rows = String(devices.length);
    if (devices.length) setState(panel, "ready");
    else setState(panel, "empty", "No stale devices: every resource reported within its interval.");
  } catch (err) {
    showError(panel, err);
  }
}

function interval(s) {
  if (!Number.isFinite(s)) return "–";
  return s % 60 === 0 ? `${fmt.count(s / 60)} min` : `${fmt.count(s)} s`;
}

main().catch((err) => {
  const note = $("vpps-note");
  note.textContent = `The page could not start: ${err.message || err}`;
  note.hidden = false;
});
