// keyguard console: rate limits (SPEC §9) — the API's list, shown by the Expose Managed API
// switch, and a key's override (the API's, unlimited, or its own list), each edited in the
// confirm dialog with the same editor of up to four rows of "n requests per unit".

import {
  $, FieldError, announce, authorized, el, idle, path, page, setError, state,
} from "./core.js";
import { closeConfirm, confirmDialog } from "./dialogs.js";
import { patchKey } from "./actions.js";

const UNITS = ["second", "minute", "hour", "day"];
const MAX_LIMITS = 4;

// [{limit: 100, per: "minute"}, …] as "100/minute, 5000/day", the way the CLI writes them.
export function describeLimits(limits) {
  return limits.map((item) => item.limit + "/" + item.per).join(", ");
}

export function apiLimitsText(api) {
  const limits = Array.isArray(api.rate_limits) ? api.rate_limits : [];
  return limits.length ? "Rate limits: " + describeLimits(limits) : "No rate limits";
}

// A key's override in a few words, or null when the server did not say (no such field).
export function keyLimitsText(key) {
  if (key.rate_limits === undefined) return null;
  if (key.rate_limits === null) return "Limits: the API's";
  return key.rate_limits.length ? "Limits: " + describeLimits(key.rate_limits) : "Unlimited";
}

export function renderApiLimits(api) {
  $("api-limits").textContent = apiLimitsText(api);
}

// -- the editor: up to four rows of (number, unit) -------------------------------------------

let editorCount = 0;

// The rows as nodes for the confirm dialog, and read() giving the list they hold (or a
// FieldError naming the row the page refuses).
function limitEditor(initial) {
  const id = "limits-" + ++editorCount;
  const hintId = id + "-hint";
  const hint = el("p", { class: "hint", id: hintId, text: "Each a whole number of requests, " +
    "at least 1, per second, minute, hour or day; up to " + MAX_LIMITS + " limits, and a " +
    "request must fit within all of them." });
  const list = el("div", { class: "limit-rows" });
  const none = el("p", { class: "muted limit-none", text: "No limits." });
  const add = el("button", { type: "button", class: "small", "aria-describedby": hintId,
    text: "Add a limit" });
  const rows = () => Array.from(list.children);
  const counts = () => rows().map((row) => row.count);

  // A row reads "[100] requests per [minute]"; its controls' names add the row's number
  // (their visible words included), so they are renamed whenever a row comes or goes.
  const renumber = () => {
    rows().forEach((row, index) => {
      const name = "Limit " + (index + 1);
      row.setAttribute("aria-label", name);
      row.count.setAttribute("aria-label", name + ": requests");
      row.unit.setAttribute("aria-label", name + ": requests per");
      row.removeButton.setAttribute("aria-label", "Remove " + name.toLowerCase());
    });
    none.hidden = rows().length > 0;
    add.disabled = rows().length >= MAX_LIMITS;
  };

  const addRow = ({ limit = "", per = "minute" } = {}) => {
    const rowId = id + "-row-" + ++editorCount;
    const count = el("input", { type: "number", id: rowId + "-count", min: "1", step: "1",
      inputmode: "numeric", autocomplete: "off", class: "limit-count",
      "aria-describedby": hintId + " confirm-error", "aria-invalid": "false" });
    count.value = String(limit);
    const unit = el("select", { id: rowId + "-unit", "aria-describedby": hintId },
      ...UNITS.map((name) => {
        const option = el("option", { value: name, text: name });
        option.selected = name === per;
        return option;
      }));
    const remove = el("button", { type: "button", class: "small", text: "Remove" });
    const row = el("div", { class: "limit-row", role: "group" }, count,
      el("label", { for: count.id, text: "requests" }), el("label", { for: unit.id, text: "per" }),
      unit, remove);
    Object.assign(row, { count, unit, removeButton: remove });
    remove.addEventListener("click", () => {
      const at = rows().indexOf(row);
      row.remove();
      renumber();
      // The focus stays in the editor: on the row that took its place, else the one before.
      const left = rows();
      (left[Math.min(at, left.length - 1)]?.count || add).focus();
      announce("Limit " + (at + 1) + " removed." + (left.length ? "" : " No limits left."));
    });
    list.append(row);
    return row;
  };

  add.addEventListener("click", () => {
    if (rows().length >= MAX_LIMITS) return;
    const row = addRow();
    renumber();
    row.count.focus();
    announce("Limit " + rows().length + " added.");
  });
  for (const item of initial) addRow(item);
  renumber();

  const read = () => {
    const all = rows();
    if (all.length > MAX_LIMITS) {
      throw new FieldError(all[all.length - 1].count, "At most " + MAX_LIMITS + " limits: " +
        "remove one.");
    }
    return all.map((row, index) => {
      const text = row.count.value.trim();
      const which = "limit " + (index + 1);
      if (!text && !row.count.validity.badInput) {
        throw new FieldError(row.count, "Enter a number of requests for " + which + ", such " +
          "as 100.");
      }
      if (!/^\d+$/.test(text) || Number(text) < 1) {
        throw new FieldError(row.count, "The number of requests of " + which + " must be a " +
          "whole number of at least 1, such as 100.");
      }
      return { limit: Number(text), per: row.unit.value };
    });
  };

  // Past the page's own checks the server can refuse only a number beyond its range, and
  // if any number is, the largest one is: that field is marked and gets the cursor.
  const refused = () => {
    const all = counts();
    if (all.length === 0) return null;
    return all.reduce((most, count) => (Number(count.value) > Number(most.value) ? count
      : most));
  };

  const first = () => counts()[0] || add;
  const box = el("div", { class: "limit-editor" }, hint, list, none, add);
  return { box, read, refused, first };
}

// -- the API's limits --------------------------------------------------------------------------

export function askApiLimits(opener) {
  if (!idle() || !state.api) return;
  const api = state.api.name;
  const editor = limitEditor(state.api.rate_limits || []);
  setError("api-limits-error", "");
  confirmDialog({
    title: "Rate limits of “" + api + "”",
    text: "They apply to each key of this API separately: 100/minute lets every key make " +
      "100 requests a minute. A key can have its own instead (its ⋮ menu). Remove every " +
      "limit for none.",
    fields: [editor.box],
    ok: "Save rate limits",
    tone: "primary",
    focus: editor.first(),
    field: editor.refused,
    api,
    back: { element: opener },
    errorId: "api-limits-error",
    run: async (pending) => {
      const limits = editor.read();
      await authorized("PUT", "apis/" + path(api), { rate_limits: limits });
      if (api === state.selected) await page.reload();
      closeConfirm(pending);
      announce(limits.length ? "Rate limits of “" + api + "”: " + describeLimits(limits) + "."
        : "“" + api + "” has no rate limits now.");
    },
  });
}

// -- a key's own ---------------------------------------------------------------------------------

const CHOICES = [
  { value: "inherit", label: "The API's limits" },
  { value: "unlimited", label: "Unlimited" },
  { value: "own", label: "Its own limits" },
];

function keyLimitsNow(now, key) {
  if (now === "inherit") return "It has the API's limits now.";
  if (now === "unlimited") return "It is unlimited now.";
  return "It has its own limits now: " + describeLimits(key.rate_limits) + ".";
}

export function askKeyLimits(key, back) {
  if (!idle()) return;
  const api = state.selected;
  const apiLimits = state.api && Array.isArray(state.api.rate_limits) ? state.api.rate_limits
    : [];
  const now = key.rate_limits === null || key.rate_limits === undefined ? "inherit"
    : key.rate_limits.length ? "own" : "unlimited";
  // The own list starts from the key's, else from the API's, else from one empty row.
  const start = now === "own" ? key.rate_limits : apiLimits.length ? apiLimits : [{}];
  const editor = limitEditor(start);
  const id = "key-limits-" + ++editorCount;
  const hint = el("p", { class: "hint", id: id + "-hint", text: "Its own limits replace the " +
    "API's for this key only; they are counted for this key alone." });
  const radios = CHOICES.map(({ value, label }) => {
    const radio = el("input", { type: "radio", name: id, value, id: id + "-" + value,
      "aria-describedby": id + "-hint" });
    radio.checked = value === now;
    const words = value === "inherit"
      ? label + " (now " + (apiLimits.length ? describeLimits(apiLimits) : "none: unlimited") +
        ")"
      : label;
    return { radio, node: el("div", { class: "choice" }, radio,
      el("label", { for: radio.id, text: words })) };
  });
  const chosen = () => radios.find(({ radio }) => radio.checked).radio.value;
  const showEditor = () => {
    editor.box.hidden = chosen() !== "own";
  };
  for (const { radio } of radios) radio.addEventListener("change", showEditor);
  showEditor();
  const group = el("fieldset", { class: "choices" },
    el("legend", { text: "Rate limits of this key" }), ...radios.map(({ node }) => node), hint);
  confirmDialog({
    title: "Rate limits of key “" + key.name + "”",
    text: keyLimitsNow(now, key) + " A request of this key must fit within each limit it " +
      "has; unlimited, it is never refused for its rate.",
    fields: [group, editor.box],
    ok: "Save rate limits",
    tone: "primary",
    focus: radios.find(({ radio }) => radio.checked).radio,
    field: () => (chosen() === "own" ? editor.refused() : null),
    api,
    back,
    errorId: key.kind + "-error",
    run: async (pending) => {
      const choice = chosen();
      const limits = choice === "inherit" ? null : choice === "unlimited" ? [] : editor.read();
      if (choice === "own" && limits.length === 0) {
        throw new FieldError(editor.first(), "Add a limit, or choose Unlimited.");
      }
      await patchKey(api, key, { rate_limits: limits });
      closeConfirm(pending);
      announce("Key “" + key.name + "”: " + (limits === null ? "the API's rate limits."
        : limits.length ? "limited to " + describeLimits(limits) + "." : "unlimited."));
    },
  });
}
