// keyguard console: the "Sharing & keys" page over the management API (SPEC §5, §5a).
//
// Plain JavaScript modules, no dependencies and no build step, nothing fetched but this
// app's own files and JSON routes, which live next to this page (relative URLs, so it works
// wherever the management app is mounted). This module signs in and out, lists the APIs,
// shows the chosen one and its settings, and starts the page; the keys are in keys.js,
// what can be done to them in actions.js and edits.js, rate limits (the API's and a key's)
// in limits.js, the shared dialogs in dialogs.js.

import {
  $, KINDS, announce, authorized, call, change, copy, el, explain, idle, invalid, page, path,
  retryable, setError, show, state, withBusy,
} from "./core.js";
import { closeConfirm, closeDialogs, confirmDialog, wireDialogs } from "./dialogs.js";
import { createKey, openCreate } from "./actions.js";
import { closeMenus, renderKind } from "./keys.js";
import { loadKeys, renderPages, resetPages, wirePages } from "./pages.js";
import { askApiLimits, renderApiLimits } from "./limits.js";
import { formatDateTime } from "./times.js";
import { clearUsage, loadUsage, wireUsage } from "./usage.js";

const TOKEN_KEY = "keyguard.token:" + location.pathname;
const API_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

// -- signing in and out -----------------------------------------------------------------------

function showOnly(id) {
  for (const section of ["loading", "sign-in", "console"]) show($(section), section === id);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  closeDialogs(true);
  // Nothing of the last session stays in the page.
  Object.assign(state, {
    apis: [],
    apisLoaded: false,
    selected: null,
    api: null,
    keys: [],
    keyReads: [],
    loads: state.loads + 1,
  });
  $("api-list").replaceChildren();
  $("internal-keys").replaceChildren();
  $("external-keys").replaceChildren();
  $("api-title").textContent = "";
  $("activity-list").replaceChildren();
  // What was typed and what was said about it: the fields' text, their errors, the banner.
  for (const node of $("console").querySelectorAll("p.error[id]")) setError(node.id, "");
  $("new-api").value = "";
  $("new-api").setAttribute("aria-invalid", "false");
  delete $("limit").dataset.api; // the next session's API shows its stored limit, not this text
  setPageError("");
  resetPages();
  clearUsage();
  setReadOnly(null);
  show($("api-detail"), false);
  document.title = "Sharing & keys · keyguard";
  show($("sign-out"), false);
  showOnly("sign-in");
  $("token").value = "";
  setError("sign-in-error", message || "");
  $("token").setAttribute("aria-invalid", message ? "true" : "false");
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const field = $("token");
  const token = field.value.trim();
  if (!token) {
    invalid(field, "sign-in-error", "Enter the management token.");
    return;
  }
  await withBusy($("sign-in-submit"), async () => {
    try {
      await start(token);
    } catch (error) {
      invalid(field, "sign-in-error", error.code === "unauthorized"
        ? "That token was not accepted. Check it and try again." : explain(error));
    }
  });
}

// Open the console with this token ("" for an app without one); throws if it is refused.
async function start(token) {
  let apis = null;
  let failure = null;
  try {
    apis = await call("GET", "apis", undefined, token);
  } catch (error) {
    if (error.code === "unauthorized" || error.code === "network") throw error;
    failure = error; // the token works (it got past authentication) but the store failed
  }
  state.token = token;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  // Which token this is: a read-only one turns every changing control off (SPEC §5a).
  let who = null;
  try {
    who = await call("GET", "whoami", undefined, token);
  } catch (error) {
    who = null; // an older server without /whoami: the server still refuses changes (403)
  }
  setReadOnly(who && who.read_only ? who.token || "" : null);
  show($("sign-out"), Boolean(token));
  setError("sign-in-error", "");
  $("token").value = "";
  showOnly("console");
  if (apis) {
    state.apis = apis.apis;
    state.apisLoaded = true;
  }
  await route({ failure, focus: true });
}

// -- the list of APIs -----------------------------------------------------------------------

function renderApiList() {
  const list = $("api-list");
  const focused = document.activeElement && list.contains(document.activeElement)
    ? document.activeElement.dataset.api : null;
  list.replaceChildren(
    ...state.apis.map((api) => {
      const link = el("a", { href: "#api=" + encodeURIComponent(api.name), "data-api": api.name },
        el("span", { class: "api-name", text: api.name }),
        el("span", { class: "pill" + (api.exposed ? " on" : ""),
          text: api.exposed ? "Exposed" : "Not exposed" }));
      if (api.name === state.selected) link.setAttribute("aria-current", "page");
      return el("li", {}, link);
    }),
  );
  if (focused) {
    const again = list.querySelector("a[data-api=\"" + CSS.escape(focused) + "\"]");
    if (again) again.focus();
  }
  show($("apis-empty"), state.apisLoaded && state.apis.length === 0);
}

async function refreshApiList() {
  const token = state.token;
  const answer = await authorized("GET", "apis");
  if (state.token !== token) return;
  state.apis = answer.apis;
  state.apisLoaded = true;
  renderApiList();
}

async function addApi(event) {
  event.preventDefault();
  const input = $("new-api");
  const name = input.value.trim();
  if (!API_NAME.test(name)) {
    invalid(input, "add-api-error", name
      ? "“" + name + "” is not a valid API name: use letters, digits, dot, dash and " +
        "underscore, starting with a letter or digit, up to 64 characters."
      : "Enter a name for the API.");
    return;
  }
  await change($("add-api-submit"), async () => {
    try {
      const existed = state.apis.some((api) => api.name === name);
      // An empty object only creates the API (not exposed), like the gateway's new API.
      await authorized("PUT", "apis/" + path(name), {});
      input.value = "";
      input.setAttribute("aria-invalid", "false");
      setError("add-api-error", "");
      announce(existed ? "API “" + name + "” already exists; showing it."
        : "API “" + name + "” added.");
      go(name);
    } catch (error) {
      if (error.code !== "unauthorized") setError("add-api-error", explain(error, { api: name }));
    }
  });
}

// -- the chosen API ---------------------------------------------------------------------------

function selectedFromAddress() {
  const match = /^#api=(.+)$/.exec(location.hash);
  if (!match) return null;
  let name;
  try {
    name = decodeURIComponent(match[1]);
  } catch (error) {
    return null;
  }
  return API_NAME.test(name) ? name : null;
}

function go(name) {
  if (state.token === null) return;
  const hash = "#api=" + encodeURIComponent(name);
  if (location.hash === hash) route({ focus: true, refresh: true });
  else location.hash = hash; // the hashchange listener routes
}

// Show the API the address names. A dialog about another API does not survive the change.
async function route({ failure = null, focus = false, refresh = false } = {}) {
  if (state.token === null) return;
  const selected = selectedFromAddress();
  if (selected !== state.selected) closeDialogs(false);
  state.selected = selected;
  closeMenus();
  renderApiList();
  if (failure) {
    pageError(failure);
    return;
  }
  setPageError("");
  if (!selected) {
    state.loads += 1;
    state.api = null;
    show($("api-detail"), false);
    show($("no-api"), true);
    return;
  }
  show($("no-api"), false);
  // Other operators may have added APIs meanwhile.
  if (refresh) refreshApiList().catch(() => undefined);
  const shown = await loadApi();
  if (shown && focus) {
    $("api-title").focus();
    announce("Showing the API “" + selected + "”.");
  }
}

// Read the chosen API and its keys, and show them unless a later read or route superseded it.
async function loadApi() {
  const name = state.selected;
  const ticket = ++state.loads;
  const current = () => ticket === state.loads && name === state.selected;
  try {
    const [api, keys] = await Promise.all([
      authorized("GET", "apis/" + path(name)),
      loadKeys(name),
    ]);
    if (!current()) return false;
    state.api = api;
    state.keys = keys.keys;
    state.keysNext = keys.next;
    state.keyReads = keys.reads;
    setPageError("");
    renderApi();
    loadActivity(name, current);
    loadUsage(name, current);
    return true;
  } catch (error) {
    if (error.code === "unauthorized" || !current()) return false;
    if (error.code === "api_not_found") {
      state.api = null;
      show($("api-detail"), false);
    }
    pageError(error, { api: name });
    return false;
  }
}

function setPageError(message, canRetry = false) {
  $("page-error-text").textContent = message;
  show($("retry"), Boolean(message) && canRetry);
  show($("page-error"), Boolean(message));
}

function pageError(error, context) {
  setPageError(explain(error, context), retryable(error));
}

async function retry() {
  await withBusy($("retry"), async () => {
    try {
      await refreshApiList();
      await route();
    } catch (error) {
      if (error.code !== "unauthorized") pageError(error);
    }
  });
}

function renderApi() {
  const api = state.api;
  show($("api-detail"), true);
  $("api-title").textContent = api.name;
  document.title = api.name + " · Sharing & keys · keyguard";
  $("expose").setAttribute("aria-checked", String(api.exposed));
  $("expose-state").textContent = api.exposed ? "On" : "Off";
  show($("not-exposed"), !api.exposed);
  renderApiLimits(api);
  // The limit field keeps what the operator typed there for this API; otherwise it shows
  // the stored value.
  const limit = $("limit");
  const stored = String(api.max_keys_per_kind);
  if (limit.dataset.api !== api.name || limit.value === limit.dataset.shown) {
    limit.value = stored;
    limit.setAttribute("aria-invalid", "false");
    setError("limit-error", "");
  }
  limit.dataset.api = api.name;
  limit.dataset.shown = stored;
  for (const kind of Object.keys(KINDS)) renderKind(kind);
  renderPages();
  // Keep the list's exposed flags in step with what was just read.
  const index = state.apis.findIndex((item) => item.name === api.name);
  if (index >= 0) state.apis[index] = api;
  else state.apis.push(api);
  renderApiList();
}

// -- a read-only session ----------------------------------------------------------------------

let readOnlyWatch = null;

// Turn every control that would change something off, saying why; ``null`` turns them on.
function setReadOnly(name) {
  state.readOnly = name !== null;
  show($("read-only"), state.readOnly);
  $("read-only-name").textContent = name || "";
  document.body.dataset.readOnly = String(state.readOnly);
  if (readOnlyWatch) readOnlyWatch.disconnect();
  readOnlyWatch = null;
  applyReadOnly();
  if (state.readOnly) {
    // Key rows are redrawn on every load: their new buttons are turned off as they come.
    readOnlyWatch = new MutationObserver(applyReadOnly);
    readOnlyWatch.observe($("console"), { childList: true, subtree: true });
  }
}

// A change refused 403 "forbidden": the token is read-only now (it was not when the page
// asked at sign-in), so the page says so and turns its changing controls off, as it would
// have from the start.
async function becameReadOnly() {
  if (state.readOnly) return;
  const token = state.token;
  let name = "";
  try {
    const who = await call("GET", "whoami", undefined, token);
    name = who && who.token ? who.token : "";
  } catch (error) {
    name = "";
  }
  if (state.token === token && !state.readOnly) setReadOnly(name);
}

function applyReadOnly() {
  for (const control of $("console").querySelectorAll("button, input, select, textarea")) {
    // Reads (Try again, the usage chart's choices) stay on: they change nothing.
    if (control.id === "retry" || control.dataset.read === "true") continue;
    if (state.readOnly) {
      if (control.disabled && control.dataset.readOnly === "true") continue;
      control.disabled = true;
      control.dataset.readOnly = "true";
      control.title = "Read-only token: changes are turned off";
      control.setAttribute("aria-describedby",
        ((control.getAttribute("aria-describedby") || "") + " read-only").trim());
    } else if (control.dataset.readOnly === "true") {
      control.disabled = false;
      delete control.dataset.readOnly;
      control.removeAttribute("title");
      const described = (control.getAttribute("aria-describedby") || "").split(" ")
        .filter((id) => id && id !== "read-only").join(" ");
      if (described) control.setAttribute("aria-describedby", described);
      else control.removeAttribute("aria-describedby");
    }
  }
}

// -- the API's activity (the audit log) -------------------------------------------------------

const ACTIONS = {
  "api.expose": "exposed the API",
  "api.unexpose": "stopped exposing the API",
  "api.update": "changed the API",
  "api.delete": "deleted the API",
  "key.create": "created the key",
  "key.update": "changed the key",
  "key.secret": "set a new secret for the key",
  "key.delete": "deleted the key",
};

async function loadActivity(name, current) {
  try {
    const answer = await authorized("GET", "audit?api=" + encodeURIComponent(name) + "&limit=20");
    if (!current()) return;
    setError("activity-error", "");
    renderActivity(answer.events);
  } catch (error) {
    if (error.code === "unauthorized" || !current()) return;
    $("activity-list").replaceChildren();
    show($("activity-empty"), false);
    setError("activity-error", "The activity could not be read: " + explain(error, { api: name }));
  }
}

function renderActivity(events) {
  $("activity-list").replaceChildren(
    ...events.map((event) => {
      const what = ACTIONS[event.action] || event.action;
      const key = event.name || event.client_id;
      const changes = Object.entries(event.changes || {})
        .map(([field, value]) => field + ": " + JSON.stringify(value)).join(", ");
      return el("li", { "data-action": event.action },
        el("time", { datetime: event.at, text: formatDateTime(event.at) }),
        el("span", { class: "activity-actor", text: event.actor }),
        el("span", { text: what + (key ? " “" + key + "”" : "") }),
        changes ? el("span", { class: "activity-changes hint", text: changes }) : null);
    }),
  );
  show($("activity-empty"), events.length === 0);
}

// -- the expose switch and the limit ---------------------------------------------------------

// Exposing is harmless; un-exposing refuses every caller at once, so it asks first.
function toggleExpose() {
  if (!idle()) return;
  const api = state.selected;
  const switchButton = $("expose");
  if (switchButton.getAttribute("aria-checked") !== "true") {
    change(switchButton, async () => {
      try {
        await setExposed(api, true);
      } catch (error) {
        if (error.code !== "unauthorized" && api === state.selected) pageError(error, { api });
      }
    });
    return;
  }
  confirmDialog({
    title: "Stop exposing “" + api + "”?",
    text: "Every call with its keys is refused at once, until you turn it on again. No key " +
      "is deleted.",
    ok: "Stop exposing",
    api,
    back: { element: switchButton },
    run: async (pending) => {
      await setExposed(api, false);
      closeConfirm(pending);
    },
  });
}

// Deleting an API takes its keys with it: the confirmation says how many.
function askDeleteApi() {
  if (!idle() || !state.api) return;
  const api = state.api.name;
  const held = state.api.keys.internal + state.api.keys.external;
  const keys = held === 1 ? "1 key" : held + " keys";
  confirmDialog({
    title: "Delete the API “" + api + "” and its " + keys + "?",
    text: (held ? "Its " + keys + " (" + state.api.keys.internal + " internal, " +
      state.api.keys.external + " external) are deleted with it: callers using them are " +
      "refused from their next request. " : "It has no keys. ") + "This cannot be undone.",
    ok: "Delete API",
    api,
    back: { element: $("delete-api") },
    run: async (pending) => {
      await authorized("DELETE", "apis/" + path(api) + "?force=true");
      state.apis = state.apis.filter((item) => item.name !== api);
      pending.back = { element: $("new-api") }; // the API's page is gone
      closeConfirm(pending);
      announce("API “" + api + "” and its " + keys + " deleted.");
      if (state.selected === api) location.hash = ""; // the hashchange listener routes
    },
  });
}

async function setExposed(api, exposed) {
  await authorized("PUT", "apis/" + path(api), { exposed });
  if (api !== state.selected) return;
  await loadApi();
  announce("“" + api + "” is " + (exposed ? "exposed." : "no longer exposed."));
}

async function saveLimit(event) {
  event.preventDefault();
  const api = state.selected;
  const input = $("limit");
  const value = input.value.trim();
  // Only the form is checked here; the range is the server's rule, and its answer says it.
  const limit = Number(value);
  if (!/^\d+$/.test(value)) {
    invalid(input, "limit-error", "Enter a whole number of keys, such as 5.");
    return;
  }
  await change($("limit-submit"), async () => {
    try {
      await authorized("PUT", "apis/" + path(api), { max_keys_per_kind: limit });
      if (api !== state.selected) return;
      input.setAttribute("aria-invalid", "false");
      setError("limit-error", "");
      await loadApi();
      announce("Up to " + limit + " keys of each kind allowed.");
    } catch (error) {
      if (error.code !== "unauthorized" && api === state.selected) {
        setError("limit-error", explain(error, { api }));
      }
    }
  });
}


// -- wiring -----------------------------------------------------------------------------------

function wire() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  $("add-api-form").addEventListener("submit", addApi);
  $("limit-form").addEventListener("submit", saveLimit);
  $("expose").addEventListener("click", toggleExpose);
  $("delete-api").addEventListener("click", askDeleteApi);
  $("edit-api-limits").addEventListener("click", () => askApiLimits($("edit-api-limits")));
  $("retry").addEventListener("click", retry);
  for (const button of document.querySelectorAll("button.create")) {
    button.addEventListener("click", () => openCreate(button.dataset.kind, button));
  }
  $("create-form").addEventListener("submit", createKey);
  $("create-cancel").addEventListener("click", () => $("create-dialog").close());
  $("create-dialog").addEventListener("close", () => {
    state.create = null;
  });
  wireDialogs();
  wireUsage();
  for (const button of document.querySelectorAll("[data-copy]")) {
    const source = $(button.dataset.copy);
    button.addEventListener("click", () => copy(source.value, button, source));
  }
  document.addEventListener("click", (event) => {
    if (!event.target.closest(".menu-wrap")) closeMenus();
  });
  window.addEventListener("hashchange", () => {
    if (state.token !== null) route({ focus: true, refresh: true });
  });
  // Back in a tab left open: "expires in 3 days" and other operators' changes are redrawn,
  // unless something is open or on its way (a reload would pull the rows from under it).
  document.addEventListener("visibilitychange", () => {
    const open = document.querySelector("dialog[open], .menu:not([hidden])");
    if (!document.hidden && state.selected && !state.busy && !open) loadApi();
  });
}

async function boot() {
  Object.assign(page, {
    reload: loadApi, error: setPageError, signOut, redraw: renderApi, readOnly: becameReadOnly,
  });
  wire();
  wirePages();
  const saved = sessionStorage.getItem(TOKEN_KEY);
  // The server marks the page: "none" when the app was built with allow_no_auth.
  const needsToken = document.body.dataset.auth !== "none";
  if (needsToken && !saved) {
    signOut("");
    return;
  }
  try {
    await start(needsToken ? saved : "");
  } catch (error) {
    if (error.code === "network") {
      showOnly("sign-in");
      setError("sign-in-error", explain(error));
    } else {
      signOut(saved ? "Your token is no longer accepted. Sign in again." : "");
    }
  }
}

boot();
