// keyguard console: the usage chart (SPEC §5a, §10) — the chosen API's requests, or one
// key's, per hour over the last 24 hours or per day over the last 30 days, admitted
// requests and 429s ("rate limited") told apart; and each key's totals in its row.
//
// The chart is inline SVG built element by element (no library, no markup), sized to the
// width it is given so that its text stays readable down to a phone's 320 px. Its numbers
// are also in a table under it, for screen readers and for anyone who wants the exact
// values. Everything here only reads: a read-only session uses it like any other
// (its buttons carry data-read, which console.js leaves enabled).

import { $, announce, authorized, el, explain, keyUrl, path, show, state } from "./core.js";

const HOUR = 3600 * 1000;
const MAX_HOURS = 840; // the longest range the management API reads (35 days)
const HEIGHT = 200; // the chart's height, in CSS pixels
const MARGIN = { top: 10, right: 8, bottom: 24, left: 44 };
const IN_FLIGHT = 4; // usage requests on their way at once, for the pages of keys shown

const RANGES = {
  day: { words: "the last 24 hours", short: "Last 24 hours", per: "hour",
    column: "Hour starting" },
  month: { words: "the last 30 days", short: "Last 30 days", per: "day", column: "Day" },
};

const number = new Intl.NumberFormat("en");
const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });

// What the chart shows; ``ticket`` numbers every read, so that only the latest is drawn.
const view = {
  api: null, // the API it belongs to
  clientId: null, // one key's, or null: every key of the API
  name: "", // that key's name
  range: "day",
  hours: 24, // the hours the latest read asked for (hoursFor(range) then)
  bars: null, // [{start: Date, label, title, requests, rateLimited}], once read
  ticket: 0,
};

// The totals per key over the chart's range, for the key rows' "Last 24 hours: …": those of
// the keys shown, read page by page with the very queries that listed them (pages.js keeps
// them in state.keyReads), so that every key listed has its line, whatever page or search
// brought it, and a large API is never read whole. ``ticket`` is the read they come from.
const totals = { api: null, range: null, ticket: 0, byKey: new Map() };
// The totals of pages added by "Show more keys" while the read numbered ``ticket`` was still
// on its way: that read did not ask for them, so it takes them in when it lands.
let early = { ticket: 0, byKey: new Map() };

// -- reading -------------------------------------------------------------------------------

// The hours to ask for: 24, or every hour since local midnight 29 days ago, so that the 30
// daily bars are today (so far) and the 29 calendar days before it.
function hoursFor(range, now = new Date()) {
  if (range === "day") return 24;
  const start = new Date(now);
  start.setHours(0, 0, 0, 0);
  start.setDate(start.getDate() - 29);
  // The first UTC hour starting at or after that midnight (zones a half hour off UTC).
  const first = Math.ceil(start.getTime() / HOUR) * HOUR;
  const current = Math.floor(now.getTime() / HOUR) * HOUR;
  return Math.min(MAX_HOURS, Math.round((current - first) / HOUR) + 1);
}

// Read the usage of the chosen API (console.js calls this with every read of the API;
// ``current`` says whether that read is still the one to show).
export async function loadUsage(api, current = () => state.selected === api) {
  if (view.api !== api) {
    view.api = api;
    view.clientId = null;
    view.bars = null;
  }
  // A key deleted or renamed meanwhile: the rows just read say so.
  if (view.clientId !== null) {
    const key = state.keys.find((item) => item.client_id === view.clientId);
    if (key) view.name = key.name;
    else view.clientId = null;
  }
  const ticket = ++view.ticket;
  const { range, clientId } = view;
  const hours = hoursFor(range);
  view.hours = hours;
  const latest = () => ticket === view.ticket && current();
  renderHead();
  try {
    const [pages, one] = await Promise.all([
      // The totals of the keys shown, one request per page they were listed in. Each
      // answer's hours count all of the API's traffic: the first one's are the chart's.
      readPages(api, shownPages(api), hours),
      clientId === null ? null
        : authorized("GET", keyUrl(api, clientId, "usage") + "?hours=" + hours),
    ]);
    if (!latest()) return;
    const byKey = early.ticket === ticket ? early.byKey : new Map();
    early = { ticket: 0, byKey: new Map() };
    for (const answer of pages) addTotals(byKey, answer);
    Object.assign(totals, { api, range, ticket, byKey });
    fillKeyLines();
    view.bars = bars((one || pages[0]).hours, range);
    showError("");
    renderChart();
  } catch (error) {
    if (error.code === "unauthorized" || !latest()) return;
    if (error.code === "key_not_found" && clientId !== null) {
      view.clientId = null; // deleted elsewhere: back to the whole API
      loadUsage(api, current);
      return;
    }
    view.bars = null;
    renderChart();
    showError("The usage could not be read: " + explain(error, { api }));
  }
}

// The totals of keys just added to the rows ("Show more keys"): read for the pages that
// listed them (``queries``, as pages.js sent them), over the range shown, and merged in.
export async function loadMoreTotals(api, queries, current) {
  const ticket = view.ticket;
  const latest = () => ticket === view.ticket && current();
  try {
    const pages = await readPages(api, queries, view.hours);
    // A newer read (another range, a reload) asked for these pages too: its answer counts.
    if (!latest()) return;
    if (totals.ticket === ticket) {
      for (const answer of pages) addTotals(totals.byKey, answer);
      fillKeyLines();
      return;
    }
    if (early.ticket !== ticket) early = { ticket, byKey: new Map() };
    for (const answer of pages) addTotals(early.byKey, answer);
  } catch (error) {
    if (error.code === "unauthorized" || !latest()) return;
    showError("The usage of the keys just shown could not be read: " + explain(error, { api }));
  }
}

// The listing queries of the keys shown when they are ``api``'s; otherwise (another API's
// keys still on their way) a page of one key, for the chart: that API's rows, once read,
// read their totals.
function shownPages(api) {
  const mine = state.api && state.api.name === api && state.keyReads.length > 0;
  return mine ? state.keyReads : ["limit=1"];
}

// The usage of ``api`` for each listing query (?limit=&after=&name=: the same keys, with
// their totals over ``hours``), in their order, a few requests at a time.
async function readPages(api, queries, hours) {
  const answers = [];
  let next = 0;
  let failed = false;
  const worker = async () => {
    while (next < queries.length && !failed) {
      const index = next;
      next += 1;
      try {
        answers[index] = await authorized("GET", "apis/" + path(api, "usage") + "?hours=" +
          hours + "&" + queries[index]);
      } catch (error) {
        failed = true;
        throw error;
      }
    }
  };
  const workers = Math.min(IN_FLIGHT, queries.length);
  await Promise.all(Array.from({ length: workers }, worker));
  return answers;
}

function addTotals(byKey, answer) {
  for (const key of answer.keys) byKey.set(key.client_id, key);
}

// Hours as bars: one per hour, or summed into the local calendar days they start in.
function bars(hours, range) {
  const points = hours.map((hour) => ({
    start: new Date(hour.start),
    requests: hour.requests,
    rateLimited: hour.rate_limited,
  }));
  if (range === "day") {
    return points.map((point) => ({
      ...point,
      label: point.start.toLocaleTimeString(undefined, { hour: "numeric", minute: "2-digit" }),
      title: point.start.toLocaleString(undefined, {
        month: "short", day: "numeric", hour: "numeric", minute: "2-digit",
      }),
    }));
  }
  const dayOf = (date) => date.getFullYear() + "-" + date.getMonth() + "-" + date.getDate();
  const days = [];
  const byDay = new Map();
  const today = new Date();
  for (let back = 29; back >= 0; back -= 1) {
    const day = new Date(today);
    day.setHours(0, 0, 0, 0);
    day.setDate(day.getDate() - back);
    const bar = {
      start: day,
      requests: 0,
      rateLimited: 0,
      label: day.toLocaleDateString(undefined, { month: "short", day: "numeric" }),
      title: day.toLocaleDateString(undefined, { weekday: "short", month: "short",
        day: "numeric" }),
    };
    days.push(bar);
    byDay.set(dayOf(day), bar);
  }
  const last = days[days.length - 1];
  for (const point of points) {
    // An hour outside the 30 days (this browser's clock and the server's disagree, or moved
    // meanwhile) counts in the nearest day: one before the first in the first, one after
    // today (the server's current hour, when its clock is ahead) in today.
    const bar = byDay.get(dayOf(point.start)) ||
      (point.start.getTime() >= last.start.getTime() ? last : days[0]);
    bar.requests += point.requests;
    bar.rateLimited += point.rateLimited;
  }
  return days;
}

// -- choosing what to show -----------------------------------------------------------------

// A key row's "View usage": that key's chart, brought into view.
export function showKeyUsage(key) {
  view.api = state.selected;
  view.clientId = key.client_id;
  view.name = key.name;
  loadUsage(state.selected);
  const heading = $("usage-title");
  heading.scrollIntoView({ block: "start" });
  heading.focus({ preventScroll: true });
  announce("Showing the usage of the key “" + key.name + "”.");
}

function showAll() {
  view.clientId = null;
  loadUsage(state.selected);
  $("usage-title").focus();
  announce("Showing the usage of every key of “" + state.selected + "”.");
}

function setRange(range) {
  if (view.range === range) return;
  view.range = range;
  loadUsage(state.selected);
  announce("Showing " + RANGES[range].words + ".");
}

// Nothing of a session stays in the page after signing out.
export function clearUsage() {
  Object.assign(view, { api: null, clientId: null, name: "", bars: null, ticket: view.ticket + 1 });
  Object.assign(totals, { api: null, range: null, ticket: 0, byKey: new Map() });
  early = { ticket: 0, byKey: new Map() };
  $("usage-svg").replaceChildren();
  $("usage-svg").setAttribute("hidden", "");
  $("usage-table").replaceChildren();
  $("usage-summary").textContent = "";
  showError("");
}

export function wireUsage() {
  $("usage-day").addEventListener("click", () => setRange("day"));
  $("usage-month").addEventListener("click", () => setRange("month"));
  $("usage-all").addEventListener("click", showAll);
  // Drawn at the width it has: again when that changes (a rotated phone, a resized window).
  let width = 0;
  new ResizeObserver(() => {
    const now = $("usage-chart").clientWidth;
    if (now !== width) {
      width = now;
      if (view.bars) renderChart();
    }
  }).observe($("usage-chart"));
}

// -- the key rows ----------------------------------------------------------------------------

// The line of a key's status that keys.js shows: its totals over the chart's range, once
// it has any.
export function usageLine(key) {
  const line = el("span", { class: "usage-line", "data-usage-of": key.client_id });
  fillLine(line);
  return line;
}

function fillKeyLines() {
  for (const line of document.querySelectorAll("[data-usage-of]")) fillLine(line);
}

function fillLine(line) {
  const key = totals.api === state.selected ? totals.byKey.get(line.dataset.usageOf) : null;
  const used = Boolean(key) && (key.requests > 0 || key.rate_limited > 0);
  line.textContent = used ? RANGES[totals.range].short + ": " +
    plural(key.requests, "request") + ", " + number.format(key.rate_limited) + " rate limited"
    : "";
  show(line, used);
}

// -- drawing -------------------------------------------------------------------------------

function renderHead() {
  const range = RANGES[view.range];
  const words = subject();
  $("usage-subject").textContent = words.charAt(0).toUpperCase() + words.slice(1);
  show($("usage-all"), view.clientId !== null);
  $("usage-day").setAttribute("aria-pressed", String(view.range === "day"));
  $("usage-month").setAttribute("aria-pressed", String(view.range === "month"));
  $("usage-numbers-label").textContent = "The numbers, " + range.per + " by " + range.per;
}

function renderChart() {
  renderHead();
  const holder = $("usage-chart");
  const data = view.bars;
  const width = Math.floor(holder.clientWidth);
  $("usage-svg").toggleAttribute("hidden", !data || width <= 0);
  if (!data) {
    $("usage-svg").replaceChildren();
    $("usage-table").replaceChildren();
    $("usage-summary").textContent = "";
    return;
  }
  const range = RANGES[view.range];
  const requests = data.reduce((sum, bar) => sum + bar.requests, 0);
  const limited = data.reduce((sum, bar) => sum + bar.rateLimited, 0);
  const summary = plural(requests, "request") + " admitted and " + number.format(limited) +
    " rate limited (answered 429)";
  $("usage-summary").textContent = summary + " in " + range.words + ".";
  if (width > 0) draw(data, width, summary);
  renderTable(data);
}

function svg(tag, attributes = {}, ...children) {
  // The SVG namespace, as the HTML parser gave it to the page's own <svg>.
  const node = document.createElementNS($("usage-svg").namespaceURI, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

// Draw the bars into the page's <svg>, at ``width`` CSS pixels, so that its text keeps
// its size at any width.
function draw(data, width, summary) {
  const plotWidth = Math.max(1, width - MARGIN.left - MARGIN.right);
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const busiest = data.reduce((best, bar) => (bar.requests + bar.rateLimited >
    best.requests + best.rateLimited ? bar : best), data[0]);
  const top = niceTop(busiest.requests + busiest.rateLimited);
  const y = (value) => MARGIN.top + plotHeight - (value / top) * plotHeight;
  const slot = plotWidth / data.length;
  const gap = Math.min(4, slot * 0.2);
  const range = RANGES[view.range];
  const peak = busiest.requests + busiest.rateLimited;
  const label = "Bar chart of the requests per " + range.per + " of " + subject() +
    " over " + range.words + ": " + summary + "." +
    (peak > 0 ? " The busiest " + range.per + ", " + busiest.title + ", had " +
      plural(peak, "request") + "." : "") + " The exact numbers are in the table below.";
  const root = $("usage-svg");
  for (const [name, value] of Object.entries({ viewBox: "0 0 " + width + " " + HEIGHT, width,
    height: HEIGHT, "aria-label": label })) {
    root.setAttribute(name, String(value));
  }
  root.replaceChildren();
  // 429s are striped as well as coloured, so that they stand apart without colour too.
  root.append(svg("defs", {}, svg("pattern", {
    id: "usage-stripes", width: 6, height: 6, patternUnits: "userSpaceOnUse",
    patternTransform: "rotate(45)",
  }, svg("rect", { width: 6, height: 6, class: "limited-fill" }),
  svg("rect", { width: 2, height: 6, class: "limited-stripe" }))));

  // The value axis: 0, half way when it is a whole number, and the top.
  const ticks = Number.isInteger(top / 2) ? [0, top / 2, top] : [0, top];
  for (const tick of ticks) {
    root.append(
      svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(tick), y2: y(tick),
        class: tick === 0 ? "axis" : "grid" }),
      svg("text", { x: MARGIN.left - 6, y: y(tick), "text-anchor": "end",
        "dominant-baseline": "middle", class: "tick" }, compact.format(tick)),
    );
  }
  // The bars, each with its exact values on hover.
  data.forEach((bar, index) => {
    const x = MARGIN.left + index * slot + gap / 2;
    const barWidth = Math.max(1, slot - gap);
    const group = svg("g", { class: "bar", "data-requests": bar.requests,
      "data-rate-limited": bar.rateLimited },
    svg("title", {}, bar.title + ": " + plural(bar.requests, "request") + " admitted, " +
      number.format(bar.rateLimited) + " rate limited"),
    svg("rect", { x: MARGIN.left + index * slot, y: MARGIN.top, width: slot,
      height: plotHeight, class: "hover" }));
    if (bar.requests > 0) {
      group.append(svg("rect", { x, width: barWidth, y: y(bar.requests),
        height: y(0) - y(bar.requests), class: "admitted" }));
    }
    if (bar.rateLimited > 0) {
      const base = y(bar.requests);
      const up = y(bar.requests + bar.rateLimited);
      group.append(svg("rect", { x, width: barWidth, y: up, height: base - up,
        class: "limited", fill: "url(#usage-stripes)" }));
    }
    root.append(group);
  });
  // The time axis: as many labels as fit, counted back from the latest bar (the latest
  // ends at the right edge); one that would touch its neighbour or the edge is left out.
  const room = view.range === "day" ? 64 : 52;
  const steps = view.range === "day" ? [1, 2, 3, 4, 6, 12] : [1, 2, 3, 5, 7, 10, 15];
  const step = steps.find((candidate) => candidate * slot >= room) || steps[steps.length - 1];
  let free = width; // where the label placed last (to the right) begins
  for (let index = data.length - 1; index >= 0; index -= step) {
    const last = index === data.length - 1;
    const x = last ? MARGIN.left + (index + 1) * slot : MARGIN.left + (index + 0.5) * slot;
    const text = svg("text", { x, y: HEIGHT - 6, "text-anchor": last ? "end" : "middle",
      class: "tick" }, data[index].label);
    root.append(text);
    const size = text.getComputedTextLength();
    const left = last ? x - size : x - size / 2;
    if (left < 0 || left + size > free - 8) {
      text.remove();
      continue;
    }
    free = left;
  }
}

// The top of the value axis: a round number, at least ``value`` (1 for an empty chart).
function niceTop(value) {
  for (let power = 1; ; power *= 10) {
    for (const step of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8]) {
      const top = step * power;
      if (top >= value && Number.isInteger(top)) return top;
    }
  }
}

function renderTable(data) {
  const range = RANGES[view.range];
  const cell = (text) => el("td", { text });
  const total = (field) => number.format(data.reduce((sum, bar) => sum + bar[field], 0));
  $("usage-table").replaceChildren(
    el("caption", { text: "Requests per " + range.per + " of " + subject() + ", " +
      range.words }),
    el("thead", {}, el("tr", {},
      el("th", { scope: "col", text: range.column }),
      el("th", { scope: "col", text: "Admitted" }),
      el("th", { scope: "col", text: "Rate limited" }))),
    el("tbody", {}, ...data.map((bar) => el("tr", {},
      el("th", { scope: "row", text: bar.title }),
      cell(number.format(bar.requests)),
      cell(number.format(bar.rateLimited))))),
    el("tfoot", {}, el("tr", {},
      el("th", { scope: "row", text: "Total" }), cell(total("requests")),
      cell(total("rateLimited")))),
  );
}

function showError(message) {
  const node = $("usage-error");
  node.textContent = message;
  show(node, Boolean(message));
}

function plural(count, word) {
  return number.format(count) + " " + word + (count === 1 ? "" : "s");
}

// "every key of “orders”" or "the key “Acme”", for the middle of a sentence.
function subject() {
  return view.clientId === null ? "every key of “" + view.api + "”"
    : "the key “" + view.name + "”";
}
