// Time-series charts on uPlot (vendored, see docs/dashboard.md): sized to their container, times drawn
// in a chosen zone, and the drawn data summarised in data-attributes for people and tests alike.
import uPlot from "../vendor/uPlot.esm.js";

export const COLORS = {
  up: "#1b7f3b",
  down: "#1f5fbf",
  load: "#1f5fbf",
  peak: "#b4521a",
  carbon: "#6b4fa3",
  market: "#1b7f3b",
  estimated: "#8a6d00",
};

const HEIGHT = 280;

/**
 * A chart in `host` (an element with `data-state`); `series` is a list of {label, color, unit, bars}.
 * Returns {setData(xs, ...ys), append(x, ...ys), points()} with xs in seconds since the epoch.
 */
export function timeChart(host, { series, zone, unit, windowSeconds = null, spanGaps = false }) {
  const canvasHost = host.querySelector(".chart");
  const barPaths = uPlot.paths.bars({ size: [0.7, 48] });
  const opts = {
    width: Math.max(canvasHost.clientWidth, 240),
    height: HEIGHT,
    // `zone` may be a function: a view whose zone follows the chosen enterprise redraws in the new one.
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), typeof zone === "function" ? zone() : zone),
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
    scales: {
      x: { time: true, range: (_u, min, max) => xRange(fixedX, min, max) },
      y: { range: (_u, min, max) => yRange(min, max) },
    },
    axes: [
      { stroke: "#444", grid: { stroke: "#e5e5e5" } },
      {
        stroke: "#444",
        grid: { stroke: "#e5e5e5" },
        size: 70,
        label: unit,
        values: (_u, splits) => splits.map((v) => v.toLocaleString()),
      },
    ],
    series: [
      {},
      ...series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: s.width ?? 2,
        dash: s.dash,
        fill: s.bars ? `${s.color}cc` : undefined,
        paths: s.bars ? barPaths : undefined,
        // Without `show`, uPlot marks the points itself where they are sparse (a single point, say).
        points: s.points ? { show: true, size: 7 } : s.bars ? { show: false } : {},
        spanGaps,
        value: (_u, v) => (v == null ? "–" : `${v.toLocaleString(undefined, { maximumFractionDigits: 1 })} ${s.unit}`),
      })),
    ],
  };
  let data = [[], ...series.map(() => [])];
  // The period asked for, when there is one: missing data then shows as a gap, not a stretched line.
  let fixedX = null;
  const plot = new uPlot(opts, data, canvasHost);
  new ResizeObserver(() => plot.setSize({ width: Math.max(canvasHost.clientWidth, 240), height: HEIGHT })).observe(
    canvasHost,
  );

  // A live chart always spans its whole window, ending now, and forgets what slid out of it.
  const slide = (end) => {
    fixedX = [end - windowSeconds, end];
    const keep = data[0].findIndex((t) => t >= end - windowSeconds);
    if (keep > 0) data = data.map((col) => col.slice(keep));
  };

  const publish = () => {
    const xs = data[0];
    host.dataset.points = String(xs.length);
    host.dataset.first = xs.length ? new Date(xs[0] * 1000).toISOString() : "";
    host.dataset.last = xs.length ? new Date(xs[xs.length - 1] * 1000).toISOString() : "";
    // Each series' sum, for checking that what is drawn is what the API answered.
    host.dataset.sums = JSON.stringify(data.slice(1).map((ys) => ys.reduce((a, v) => a + (v ?? 0), 0)));
  };

  return {
    setRange(from, to) {
      fixedX = [from, to];
    },
    setData(xs, ...ys) {
      data = [xs, ...ys];
      if (windowSeconds) slide(Date.now() / 1000);
      plot.setData(data);
      publish();
    },
    append(x, ...ys) {
      const last = data[0][data[0].length - 1];
      if (last !== undefined && x <= last) {
        // Same timestamp again (a poll between two updates): replace, never draw backwards.
        if (x === last) data.forEach((col, i) => (col[col.length - 1] = i === 0 ? x : ys[i - 1]));
      } else {
        data[0].push(x);
        ys.forEach((v, i) => data[i + 1].push(v));
      }
      if (windowSeconds) slide(Math.max(x, Date.now() / 1000));
      plot.setData(data);
      publish();
    },
    points: () => data[0].length,
  };
}

function xRange(fixed, min, max) {
  if (fixed) return fixed;
  if (min == null || max == null) return [Date.now() / 1000 - 3600, Date.now() / 1000];
  // A single point: half a day either side, so a lone daily bar is not stretched over years.
  return min === max ? [min - 43_200, max + 43_200] : [min, max];
}

function yRange(min, max) {
  // Zero always in view: capacity and energy are read against it, and a flat series still shows.
  const lo = Math.min(0, min ?? 0);
  const hi = Math.max(0, max ?? 0);
  const pad = (hi - lo || 1) * 0.08;
  return [lo < 0 ? lo - pad : 0, hi + pad];
}

export const seconds = (ts) => Date.parse(ts) / 1000;
