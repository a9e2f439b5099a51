// What both views share: the API key, calls to /v1 with problem+json errors, units and time zones.

const KEY_STORAGE = "meterflow.apiKey";

export class ApiError extends Error {
  constructor(status, title, detail, path) {
    super(`${status || "network"} ${title}`);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.path = path;
  }

  /** A route that is not deployed (yet), as opposed to a failure of one that is. */
  get unavailable() {
    return this.status === 404 || this.status === 405 || this.status === 501;
  }

  describe() {
    if (this.status === 0) return `The API did not answer (${this.detail}).`;
    if (this.status === 401) return "The API key was refused. Enter a valid key.";
    if (this.status === 403) return `This key may not read ${this.path}: ${this.detail || this.title}.`;
    if (this.unavailable) {
      return `Not available: GET ${this.path} answered ${this.status} ${this.title}${this.extra(" (", ")")}.`;
    }
    return `GET ${this.path} failed: ${this.status} ${this.title}${this.extra(": ", "")}.`;
  }

  extra(before, after) {
    return this.detail && this.detail !== this.title ? `${before}${this.detail}${after}` : "";
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE);
}

export function authHeaders() {
  // The key travels only in this header, never in a URL, so it stays out of logs and history.
  return { Authorization: `Bearer ${apiKey()}` };
}

export function apiUrl(path, params = {}) {
  const url = new URL(`/v1${path}`, window.location.origin);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
  }
  return url;
}

/** GET a /v1 route; resolves to its JSON, rejects with an ApiError. */
export async function api(path, params = {}, { signal } = {}) {
  const url = apiUrl(path, params);
  // The path without the query: readable in a message, and the query is on the page already.
  const shown = url.pathname;
  let response;
  try {
    response = await fetch(url, { headers: { ...authHeaders(), Accept: "application/json" }, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "unreachable", String(err.message || err), shown);
  }
  if (response.ok) return response.json();
  throw await problemOf(response, shown);
}

export async function problemOf(response, shown) {
  let title = response.statusText || "error";
  let detail = "";
  try {
    const problem = await response.json();
    title = problem.title || title;
    detail = typeof problem.detail === "string" ? problem.detail : JSON.stringify(problem.detail ?? "");
  } catch {
    // Not problem+json (a proxy's page, say): the status line is all there is.
  }
  const error = new ApiError(response.status, title, detail, shown);
  if (response.status === 401) document.dispatchEvent(new CustomEvent("meterflow:unauthorized"));
  return error;
}

/** All items of a `Page` list route, following `next_cursor`. */
export async function apiList(path, params = {}) {
  const items = [];
  let cursor = null;
  do {
    const page = await api(path, { ...params, cursor });
    items.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

// --- the key form ------------------------------------------------------------------------------

/** Wire the header's key form; resolves once a key is stored (at once when there already is one). */
export function setupKey() {
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const message = document.getElementById("key-message");
  const change = document.getElementById("change-key");
  const forget = document.getElementById("forget-key");
  const status = document.getElementById("key-status");

  const showStatus = () => {
    const key = apiKey();
    status.textContent = key ? `Key …${key.slice(-4)}` : "No API key";
  };
  const ask = (why) => {
    message.textContent = why;
    dialog.hidden = false;
    input.value = "";
    input.focus();
  };
  showStatus();
  change.addEventListener("click", () => ask("Enter another API key."));
  forget.addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    showStatus();
    ask("The key was removed from this browser. Enter an API key to continue.");
  });
  document.addEventListener("meterflow:unauthorized", () => {
    if (dialog.hidden) ask("The API key was refused (401). Enter a valid key.");
  });

  return new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        message.textContent = "The key cannot be empty.";
        return;
      }
      localStorage.setItem(KEY_STORAGE, key);
      input.value = "";
      dialog.hidden = true;
      showStatus();
      document.dispatchEvent(new CustomEvent("meterflow:key-changed"));
      resolve();
    });
    if (apiKey()) {
      dialog.hidden = true;
      resolve();
    } else {
      ask("Enter your meterflow API key. It is kept in this browser only and sent as a Bearer header.");
    }
  });
}

// --- panels: loading, empty, error states --------------------------------------------------------

/** Set a panel's state (`loading`, `ready`, `empty`, `unavailable`, `error`) and its message. */
export function setState(panel, state, text = "") {
  panel.dataset.state = state;
  panel.setAttribute("aria-busy", state === "loading" ? "true" : "false");
  const note = panel.querySelector(".note");
  if (note) {
    note.textContent = text;
    note.hidden = !text;
  }
}

export function showError(panel, err) {
  if (err.name === "AbortError") return;
  if (err instanceof ApiError) {
    setState(panel, err.unavailable ? "unavailable" : "error", err.describe());
  } else {
    setState(panel, "error", `Could not show this: ${err.message || err}`);
  }
}

// --- numbers with units ----------------------------------------------------------------------------

const formats = new Map();
function number(value, digits) {
  if (!formats.has(digits)) {
    formats.set(
      digits,
      new Intl.NumberFormat(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits }),
    );
  }
  return formats.get(digits).format(value);
}

const missing = "–";
const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

export const fmt = {
  kw: (v) => (isNumber(v) ? `${number(v, Math.abs(v) < 100 ? 1 : 0)} kW` : missing),
  kwh: (v) =>
    isNumber(v) ? (Math.abs(v) >= 100_000 ? `${number(v / 1000, 1)} MWh` : `${number(v, 1)} kWh`) : missing,
  co2: (kg) =>
    isNumber(kg) ? (Math.abs(kg) >= 1000 ? `${number(kg / 1000, 2)} tCO₂e` : `${number(kg, 1)} kgCO₂e`) : missing,
  count: (v) => (isNumber(v) ? number(v, 0) : missing),
  plain: (v, digits = 2) => (isNumber(v) ? number(v, digits) : missing),
};

// --- time zones ------------------------------------------------------------------------------------

export const browserZone = Intl.DateTimeFormat().resolvedOptions().timeZone;

/** "Asia/Shanghai (GMT+08:00)": the zone every time on the page is shown in. */
export function zoneLabel(zone) {
  const offset = new Intl.DateTimeFormat("en", { timeZone: zone, timeZoneName: "longOffset" })
    .formatToParts(new Date())
    .find((part) => part.type === "timeZoneName");
  return `${zone} (${offset ? offset.value : "local"})`;
}

export function fmtTime(ts, zone, { date = true, seconds = false } = {}) {
  if (!ts) return missing;
  const options = { timeZone: zone, hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
  if (seconds) options.second = "2-digit";
  if (date) Object.assign(options, { year: "numeric", month: "short", day: "numeric" });
  return new Intl.DateTimeFormat(undefined, options).format(new Date(ts));
}

export function fmtDay(ts, zone) {
  return new Intl.DateTimeFormat(undefined, { timeZone: zone, year: "numeric", month: "short", day: "numeric" }).format(
    new Date(ts),
  );
}

/** The calendar date (YYYY-MM-DD) of an instant in a zone. */
export function dayIn(instant, zone) {
  return new Intl.DateTimeFormat("en-CA", { timeZone: zone }).format(instant);
}

/** The instant a calendar date (YYYY-MM-DD) starts in a zone, as RFC 3339 in UTC. */
export function startOfDay(day, zone) {
  const [y, m, d] = day.split("-").map(Number);
  const guess = Date.UTC(y, m - 1, d);
  // The zone's offset at the guess; a second pass settles days whose offset changes at midnight.
  let instant = guess - offsetMs(guess, zone);
  instant = guess - offsetMs(instant, zone);
  return new Date(instant).toISOString();
}

function offsetMs(instant, zone) {
  const parts = Object.fromEntries(
    new Intl.DateTimeFormat("en-US", {
      timeZone: zone,
      hourCycle: "h23",
      year: "numeric",
      month: "2-digit",
      day: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
    })
      .formatToParts(new Date(instant))
      .filter((p) => p.type !== "literal")
      .map((p) => [p.type, Number(p.value)]),
  );
  const wall = Date.UTC(parts.year, parts.month - 1, parts.day, parts.hour, parts.minute, parts.second);
  return wall - Math.floor(instant / 1000) * 1000;
}

export function addDays(day, n) {
  const [y, m, d] = day.split("-").map(Number);
  return new Date(Date.UTC(y, m - 1, d + n)).toISOString().slice(0, 10);
}

// --- small DOM helpers -----------------------------------------------------------------------------

/** A table row headed by `label` (a `th` with row scope, so screen readers name each cell's row). */
export function headedRow(tbody, label) {
  const tr = tbody.insertRow();
  const th = document.createElement("th");
  th.scope = "row";
  th.textContent = label;
  tr.append(th);
  return tr;
}

export function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

export function fillSelect(select, options, wanted) {
  select.replaceChildren(
    ...options.map(({ value, label }) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      return option;
    }),
  );
  if (wanted && options.some((o) => o.value === wanted)) select.value = wanted;
  select.disabled = options.length === 0;
}

/** Selections live in the URL's query string (never the key), so a view can be bookmarked and shared. */
export function readParams() {
  return new URLSearchParams(window.location.search);
}

export function writeParams(values) {
  const params = readParams();
  for (const [name, value] of Object.entries(values)) {
    if (value) params.set(name, value);
    else params.delete(name);
  }
  history.replaceState(null, "", `${window.location.pathname}?${params}`);
}
