// keyguard console: the two sections of keys — their tables, each key's state at a glance,
// and its ⋮ menu of actions (the actions themselves are in actions.js, edits.js and
// limits.js).

import {
  $, KINDS, copy, el, hiddenText, show, state,
} from "./core.js";
import { focusInRow } from "./dialogs.js";
import {
  askDelete, askDisable, askRename, askReplace, askSetSecret, enable,
} from "./actions.js";
import { askExpiry, askMeta } from "./edits.js";
import { askKeyLimits, describeLimits, keyLimitsText } from "./limits.js";
import { formatDate, formatDateTime, isPast, when } from "./times.js";
import { showKeyUsage, usageLine } from "./usage.js";

const META_SHOWN = 60; // characters of a key's meta shown in its row; all of it on hover

export function renderKind(kind) {
  const api = state.api;
  const keys = state.keys.filter((key) => key.kind === kind);
  // Counted from the list shown when it is whole, so that the two always agree; from the
  // API's counts while pages are left to show or a search is on (pages.js).
  const whole = !state.keysNext && !state.keyFilter;
  const count = whole || !api.keys ? keys.length : api.keys[kind];
  $(kind + "-count").replaceChildren(count + " of " + api.max_keys_per_kind,
    hiddenText(" " + KINDS[kind].word + " keys"));
  const holder = $(kind + "-keys");
  const focusedRow = holder.contains(document.activeElement)
    ? document.activeElement.closest("tr") : null;
  const focusedId = focusedRow ? focusedRow.dataset.clientId : null;
  const focusedLabel = focusedId ? document.activeElement.getAttribute("aria-label") : null;
  if (keys.length === 0) {
    const none = state.keyFilter
      ? "No " + KINDS[kind].word + " keys whose name contains “" + state.keyFilter + "”"
        + (state.keysNext ? " among those shown." : ".")
      : "No " + KINDS[kind].word + " keys" + (state.keysNext ? " among those shown." : " yet.");
    holder.replaceChildren(el("p", { class: "muted empty-keys", text: none }));
    return;
  }
  // Explicit roles: at phone width the rows become cards (CSS display), which would
  // otherwise drop the table's meaning for screen readers.
  const header = (text) => el("th", { scope: "col", role: "columnheader" }, text);
  const head = el("thead", { role: "rowgroup" }, el("tr", { role: "row" },
    header("Name"), header("Client ID"), header("Secret"), header("Status"),
    header(hiddenText("Actions"))));
  const body = el("tbody", { role: "rowgroup" }, ...keys.map((key) => keyRow(key)));
  holder.replaceChildren(el("table", { class: "keys", role: "table" },
    el("caption", { class: "visually-hidden", text: KINDS[kind].title + ": keys" }),
    head, body));
  if (focusedId) focusInRow(focusedId, focusedLabel);
}

function keyRow(key) {
  const idCode = el("code", { text: key.client_id });
  const copyId = el("button", {
    type: "button",
    class: "small copy",
    "data-read": "true", // copying changes nothing: on in a read-only session too
    "aria-label": "Copy the client ID of " + key.name,
    text: "Copy",
    onclick: (event) => copy(key.client_id, event.currentTarget, idCode),
  });
  const secret = el("div", { class: "secret-cell" },
    el("span", { text: key.has_secret ? "Yes" : "No" }));
  if (key.kind === "external") {
    secret.append(el("button", {
      type: "button",
      class: "small",
      "aria-label": "Set API Secret for " + key.name,
      text: "Set API Secret",
      onclick: (event) => askSetSecret(key, event.currentTarget),
    }));
  }
  const cell = (label, ...content) => el("td", { role: "cell", "data-label": label }, ...content);
  const name = cell("Name", key.name);
  name.className = "name";
  const actions = cell("", keyMenu(key));
  actions.className = "actions";
  const status = cell("Status", statusList(key));
  status.className = "status";
  const row = el("tr", { role: "row", "data-client-id": key.client_id },
    name,
    cell("Client ID", el("div", { class: "client-id" }, idCode, copyId)),
    cell("Secret", secret),
    status,
    actions);
  if (!admits(key)) row.classList.add("refused");
  return row;
}

function admits(key) {
  return key.enabled !== false && !(key.expires_at && isPast(key.expires_at));
}

// The key's lifecycle (SPEC §8) in a few words: enabled or not, its expiry, its rate limits
// (§9), a secret still in its grace period, when it was last used and created, and its meta.
function statusList(key) {
  const items = [];
  const enabled = key.enabled !== false;
  items.push(el("span", { class: "badge " + (enabled ? "on" : "off"),
    text: enabled ? "Enabled" : "Disabled" }));
  if (key.expires_at && isPast(key.expires_at)) {
    items.push(el("span", { class: "badge off", title: formatDateTime(key.expires_at),
      text: "Expired" }));
  } else if (key.expires_at) {
    items.push(el("span", { class: "soon", title: formatDateTime(key.expires_at),
      text: "Expires " + when(key.expires_at) }));
  } else {
    items.push(el("span", { class: "muted", text: "No expiry" }));
  }
  const limits = keyLimitsText(key);
  if (limits !== null) {
    const apiLimits = state.api && Array.isArray(state.api.rate_limits) ? state.api.rate_limits
      : [];
    // Inheriting: what the API's limits are now, on hover.
    const title = key.rate_limits === null
      ? (apiLimits.length ? "The API's: " + describeLimits(apiLimits) : "The API has none") : "";
    items.push(el("span", { class: key.rate_limits === null ? "muted" : "", title,
      text: limits }));
  }
  const previous = key.previous_secret_expires_at;
  if (previous && !isPast(previous)) {
    items.push(el("span", { text: "Previous secret valid until " + formatDateTime(previous) }));
  }
  if (key.last_used_at !== undefined) {
    // Relative ("2 hours ago"), the exact local time on hover.
    items.push(key.last_used_at
      ? el("span", { class: "muted" }, "Last used ", el("time", { datetime: key.last_used_at,
        title: formatDateTime(key.last_used_at), text: when(key.last_used_at) }))
      : el("span", { class: "muted", text: "Never used" }));
  }
  items.push(usageLine(key));
  // Reading a key's usage changes nothing: it stays on in a read-only session.
  items.push(el("button", { type: "button", class: "small", "data-read": "true",
    "aria-label": "View usage of key " + key.name, text: "View usage",
    onclick: () => showKeyUsage(key) }));
  items.push(el("span", { class: "muted" }, "Created ", el("time", { datetime: key.created_at,
    title: key.created_at, text: formatDate(key.created_at) })));
  const meta = key.meta && typeof key.meta === "object" ? key.meta : {};
  if (Object.keys(meta).length > 0) {
    items.push(el("span", { class: "meta" }, el("span", { class: "muted", text: "Meta: " }),
      el("code", { title: JSON.stringify(meta), text: compactMeta(meta) })));
  }
  return el("ul", { class: "status-list" }, ...items.map((item) => el("li", {}, item)));
}

// {"plan": "gold", "seats": 5} as "plan: gold, seats: 5", cut short when long.
function compactMeta(meta) {
  const text = Object.entries(meta)
    .map(([name, value]) => name + ": " + (typeof value === "string" ? value
      : JSON.stringify(value)))
    .join(", ");
  return text.length > META_SHOWN ? text.slice(0, META_SHOWN - 1) + "…" : text;
}

// -- the ⋮ menu ----------------------------------------------------------------------------

let menuCount = 0;

function keyMenu(key) {
  const id = "key-menu-" + ++menuCount;
  const label = "Actions for key " + key.name;
  const button = el("button", {
    type: "button",
    class: "menu-button",
    "aria-haspopup": "menu",
    "aria-expanded": "false",
    "aria-controls": id,
    "aria-label": label,
    text: "⋮",
  });
  const back = { clientId: key.client_id, label };
  const enabled = key.enabled !== false;
  const choices = [
    enabled ? ["Disable key", () => askDisable(key, back)]
      : ["Enable key", () => enable(key, button, back)],
    ["Rename…", () => askRename(key, back)],
    ["Set or clear expiry…", () => askExpiry(key, back)],
    ["Edit metadata…", () => askMeta(key, back)],
    ["Edit rate limits…", () => askKeyLimits(key, back)],
    key.kind === "external" ? ["Set API Secret…", () => askSetSecret(key, button)]
      : ["Replace key…", () => askReplace(key, back)],
    ["Delete key", () => askDelete(state.selected, key, back), "danger"],
  ];
  const entries = choices.map(([text, action, tone]) => {
    const item = el("button", { type: "button", role: "menuitem", tabindex: "-1", text });
    if (tone) item.className = tone;
    item.addEventListener("click", () => {
      close(false);
      action();
    });
    return el("li", { role: "none" }, item);
  });
  const menu = el("ul", { class: "menu", role: "menu", id, "aria-label": label, hidden: "" },
    ...entries);
  const items = () => Array.from(menu.querySelectorAll("[role=menuitem]"));
  const open = (focusLast) => {
    closeMenus();
    show(menu, true);
    button.setAttribute("aria-expanded", "true");
    const all = items();
    all[focusLast ? all.length - 1 : 0].focus();
  };
  const close = (refocus) => {
    show(menu, false);
    button.setAttribute("aria-expanded", "false");
    if (refocus) button.focus();
  };
  menu.closeMenu = close;
  button.addEventListener("click", () => {
    if (menu.hidden) open(false);
    else close(true);
  });
  button.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      open(event.key === "ArrowUp");
    }
  });
  menu.addEventListener("keydown", (event) => {
    const all = items();
    const at = all.indexOf(document.activeElement);
    if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      close(true);
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const step = event.key === "ArrowDown" ? 1 : -1;
      all[(at + step + all.length) % all.length].focus();
    } else if (event.key === "Home" || event.key === "End") {
      event.preventDefault();
      all[event.key === "Home" ? 0 : all.length - 1].focus();
    } else if (event.key === "Tab") {
      close(false);
    }
  });
  return el("div", { class: "menu-wrap" }, button, menu);
}

export function closeMenus() {
  for (const menu of document.querySelectorAll(".menu")) {
    if (!menu.hidden && menu.closeMenu) menu.closeMenu(false);
  }
}
