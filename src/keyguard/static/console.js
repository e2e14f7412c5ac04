// keyguard console: the "Sharing & keys" page over the management API (SPEC §5).
//
// Plain JavaScript, no dependencies, nothing fetched but this app's own JSON
// routes, which live next to this page (relative URLs, so it works wherever
// the management app is mounted). Every value from the server reaches the page
// through textContent or an input's value, never as markup.
"use strict";

(function () {
  const TOKEN_KEY = "keyguard.token:" + location.pathname;
  const API_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
  const KINDS = {
    internal: {
      title: "Sharing within your organization",
      word: "internal",
      create: "For members of your organization: it gets a client id and a secret now, and " +
        "neither can ever change.",
      lost: "delete this key and create a new one.",
    },
    external: {
      title: "Sharing outside your organization",
      word: "external",
      create: "For a customer outside your organization: it gets a client id now; you can set " +
        "a secret for it later with Set API Secret.",
      lost: "use Set API Secret again to replace it.",
    },
  };

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null, // null: not signed in; "": the app needs no token (allow_no_auth)
    apis: [],
    apisLoaded: false, // whether state.apis was read (an empty list then means "no APIs")
    selected: null, // the chosen API's name, from the address (#api=...)
    api: null, // the chosen API, as GET /apis/{api} answered
    keys: [],
    loads: 0, // numbers every read of the chosen API, so that only the latest is shown
    busy: false, // a change is being saved (one at a time: see change())
    create: null, // {api, kind, opener} while the create dialog is open
    confirm: null, // {run, back, errorId, api} while the confirm dialog is open
    secretReturn: null, // where focus goes when the secret dialog closes
  };

  // -- talking to the management API ------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail || code || "HTTP " + status);
      this.status = status;
      this.code = code;
      this.detail = detail;
    }
  }

  function path(...parts) {
    return parts.map((part) => encodeURIComponent(part)).join("/");
  }

  async function call(method, url, body, token = state.token) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (error) {
      throw new ApiError(0, "network", "");
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (error) {
      data = null;
    }
    if (response.ok) return data;
    const problem = data && typeof data === "object" ? data : {};
    throw new ApiError(response.status, problem.code || null, problem.detail || "");
  }

  // A call made by a signed-in user: an unaccepted token sends them back to sign in (unless
  // they signed out, or in again, while it was on its way).
  async function authorized(method, url, body) {
    const token = state.token;
    if (token === null) throw new ApiError(401, "unauthorized", "");
    try {
      return await call(method, url, body, token);
    } catch (error) {
      if (error.code === "unauthorized" && state.token === token) {
        signOut("Your token is no longer accepted. Sign in again.");
      }
      throw error;
    }
  }

  // Words a person understands, for every error the management API can answer.
  function explain(error, context = {}) {
    const api = context.api || state.selected || "this API";
    switch (error.code) {
      case "network":
        return "Could not reach the keyguard server. Check that it is running and try again.";
      case "store_unavailable":
        return "The key store is not answering right now, so nothing was changed. " +
          "Try again in a moment.";
      case "api_not_exposed":
        return "“" + api + "” is not exposed, so no key can be created. " +
          "Turn on “Expose Managed API” first.";
      case "key_limit_reached": {
        const limit = state.api && state.api.name === api ? state.api.max_keys_per_kind : null;
        const word = context.kind ? KINDS[context.kind].word + " " : "";
        return (limit === null ? "This API has reached its limit of " + word + "keys. "
          : "This API already has the most " + word + "keys it allows (" + limit + "). ") +
          "Delete one before creating another.";
      }
      case "duplicate_name":
        return "A key named “" + (context.name || "") + "” already exists in this API " +
          "(names are compared ignoring case). Choose another name.";
      case "key_immutable":
        return "Internal keys keep the secret they were created with: it cannot be set or " +
          "replaced.";
      case "key_not_found":
        return "That key no longer exists; someone may have deleted it. The list is refreshed.";
      case "api_not_found":
        return "The API “" + api + "” does not exist. Add it with “Add an API”.";
      case "unauthorized":
        return "The token was not accepted.";
      case "invalid_request":
        return "That was not accepted: " + (error.detail || "the request was invalid") + ".";
      default:
        return "Something went wrong (HTTP " + error.status + "). " +
          (error.detail ? error.detail + ". " : "") + "Try again; if it persists, see the " +
          "server's log.";
    }
  }

  function retryable(error) {
    return error.code === "network" || error.code === "store_unavailable" || error.status >= 500;
  }

  // -- small helpers for the page -----------------------------------------------------------

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(typeof child === "string" ? document.createTextNode(child) : child);
      }
    }
    return node;
  }

  function hiddenText(text) {
    return el("span", { class: "visually-hidden", text });
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function setError(id, message) {
    const node = $(id);
    node.textContent = message || "";
    show(node, Boolean(message));
  }

  // Say what is wrong with a field, next to it, and put the cursor there.
  function invalid(field, errorId, message) {
    setError(errorId, message);
    field.setAttribute("aria-invalid", "true");
    field.focus();
  }

  function announce(message) {
    const node = $("announcer");
    node.textContent = "";
    // A fresh text node a moment later, so that screen readers announce a repeat too.
    setTimeout(() => {
      node.textContent = message;
    }, 50);
  }

  // Run an action from a button, which is disabled meanwhile (no double submit) and keeps
  // the keyboard focus it had, even if the page was redrawn around it.
  async function withBusy(button, action) {
    if (button.disabled) return undefined;
    const hadFocus = document.activeElement === button;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      return await action();
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      if (hadFocus && button.isConnected && document.activeElement === document.body) {
        button.focus();
      }
    }
  }

  // One change at a time: a second one, started before the first is answered, would race
  // it for the page and, for a secret, for the only moment it can be shown. Signing out
  // waits too, so that no answer arrives after the session it belongs to.
  async function change(button, action) {
    if (!idle()) return;
    state.busy = true;
    $("sign-out").disabled = true;
    try {
      await withBusy(button, action);
    } finally {
      state.busy = false;
      $("sign-out").disabled = false;
    }
  }

  // Whether a new change may start now (else the operator is told to wait).
  function idle() {
    if (state.busy) announce("Wait a moment: the last change is still being saved.");
    return !state.busy;
  }

  async function copy(text, button, source) {
    let copied = false;
    try {
      await navigator.clipboard.writeText(text);
      copied = true;
    } catch (error) {
      // No clipboard API here (not a secure context): select the text for Ctrl+C instead.
      if (source instanceof HTMLInputElement) {
        source.select();
      } else if (source) {
        const range = document.createRange();
        range.selectNodeContents(source);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
      }
    }
    if (!button.dataset.label) button.dataset.label = button.textContent;
    button.textContent = copied ? "Copied" : "Press Ctrl+C";
    announce(copied ? "Copied to the clipboard." : "Selected: press Ctrl+C to copy.");
    clearTimeout(button.copyTimer);
    button.copyTimer = setTimeout(() => {
      button.textContent = button.dataset.label;
    }, 2000);
  }

  function formatDate(value) {
    const date = new Date(value);
    if (Number.isNaN(date.getTime())) return value;
    return date.toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
  }

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
      loads: state.loads + 1,
    });
    $("api-list").replaceChildren();
    $("internal-keys").replaceChildren();
    $("external-keys").replaceChildren();
    $("api-title").textContent = "";
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
        authorized("GET", "apis/" + path(name, "keys")),
      ]);
      if (!current()) return false;
      state.api = api;
      state.keys = keys.keys;
      setPageError("");
      renderApi();
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
    // Keep the list's exposed flags in step with what was just read.
    const index = state.apis.findIndex((item) => item.name === api.name);
    if (index >= 0) state.apis[index] = api;
    else state.apis.push(api);
    renderApiList();
  }

  function renderKind(kind) {
    const api = state.api;
    const keys = state.keys.filter((key) => key.kind === kind);
    // Counted from the list shown, so that the two always agree.
    $(kind + "-count").replaceChildren(keys.length + " of " + api.max_keys_per_kind,
      hiddenText(" " + KINDS[kind].word + " keys"));
    const holder = $(kind + "-keys");
    const focusedRow = holder.contains(document.activeElement)
      ? document.activeElement.closest("tr") : null;
    const focusedId = focusedRow ? focusedRow.dataset.clientId : null;
    const focusedLabel = focusedId ? document.activeElement.getAttribute("aria-label") : null;
    if (keys.length === 0) {
      holder.replaceChildren(el("p", { class: "muted empty-keys",
        text: "No " + KINDS[kind].word + " keys yet." }));
      return;
    }
    // Explicit roles: at phone width the rows become cards (CSS display), which would
    // otherwise drop the table's meaning for screen readers.
    const header = (text) => el("th", { scope: "col", role: "columnheader" }, text);
    const head = el("thead", { role: "rowgroup" }, el("tr", { role: "row" },
      header("Name"), header("Client ID"), header("Secret"), header("Created"),
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
    const created = el("time", { datetime: key.created_at, title: key.created_at,
      text: formatDate(key.created_at) });
    const cell = (label, ...content) => el("td", { role: "cell", "data-label": label }, ...content);
    const name = cell("Name", key.name);
    name.className = "name";
    const actions = cell("", keyMenu(key));
    actions.className = "actions";
    return el("tr", { role: "row", "data-client-id": key.client_id },
      name,
      cell("Client ID", el("div", { class: "client-id" }, idCode, copyId)),
      cell("Secret", secret),
      cell("Created", created),
      actions);
  }

  // Focus a control of a key's row: the one with this label, else the row's first button.
  function focusInRow(clientId, label) {
    const row = document.querySelector("tr[data-client-id=\"" + CSS.escape(clientId) + "\"]");
    if (!row) return false;
    const target = (label && row.querySelector("[aria-label=\"" + CSS.escape(label) + "\"]")) ||
      row.querySelector("button");
    if (target) target.focus();
    return Boolean(target);
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

  // -- creating keys ----------------------------------------------------------------------------

  function openCreate(kind, opener) {
    if (!idle()) return;
    state.create = { api: state.selected, kind, opener };
    $("create-title").textContent = "Create an " + KINDS[kind].word + " API key";
    $("create-kind").textContent = "In “" + state.selected + "”. " + KINDS[kind].create;
    $("key-name").value = "";
    $("key-name").setAttribute("aria-invalid", "false");
    setError("create-error", "");
    setError(kind + "-error", "");
    $("create-dialog").showModal();
    $("key-name").focus();
  }

  async function createKey(event) {
    event.preventDefault();
    const pending = state.create;
    if (!pending) return;
    const { api, kind, opener } = pending;
    const input = $("key-name");
    const name = input.value.trim();
    if (!name) {
      invalid(input, "create-error", "Enter a name for the key.");
      return;
    }
    await change($("create-save"), async () => {
      try {
        const key = await authorized("POST", "apis/" + path(api, "keys"), { name, kind });
        // The dialog closes once the page shows the new key: then the change is complete.
        if (api === state.selected) await loadApi();
        if (state.create === pending) $("create-dialog").close();
        if (key.secret) {
          // Even if the operator moved on meanwhile: this is the only time it can be shown.
          showSecret(api, key, key.secret, { element: opener });
        } else if (api === state.selected) {
          announce("External key “" + key.name + "” created. It has no secret yet.");
          focusInRow(key.client_id, "Set API Secret for " + key.name);
        }
      } catch (error) {
        if (error.code === "unauthorized") return;
        if (state.create !== pending) {
          // The dialog was closed meanwhile: say it next to the section instead.
          if (api === state.selected) setError(kind + "-error", explain(error, { api, kind, name }));
          return;
        }
        setError("create-error", explain(error, { api, kind, name }));
        input.setAttribute("aria-invalid", String(error.code === "duplicate_name" ||
          error.code === "invalid_request"));
        input.focus();
        if (error.code === "key_limit_reached" || error.code === "api_not_exposed") {
          loadApi(); // the counts or the switch were out of date
        }
      }
    });
  }

  // The one moment a secret is on screen. However the dialog closes, its "close" handler
  // wipes the secret from the page.
  function showSecret(api, key, secret, back) {
    $("secret-key").textContent = "The " + KINDS[key.kind].word + " key “" + key.name +
      "” of the API “" + api + "”";
    $("secret-lost").textContent = KINDS[key.kind].lost;
    $("secret-client-id").value = key.client_id;
    $("secret-value").value = secret;
    state.secretReturn = back;
    $("secret-dialog").showModal();
    $("secret-value").focus();
    $("secret-value").select();
  }

  function wipeSecret() {
    $("secret-value").value = "";
    $("secret-client-id").value = "";
    getSelection().removeAllRanges();
  }

  function closeSecret() {
    wipeSecret(); // at once, not when the browser gets round to the "close" event
    $("secret-dialog").close();
  }

  function secretClosed() {
    wipeSecret();
    const back = state.secretReturn;
    state.secretReturn = null;
    restoreFocus(back);
  }

  // Put the focus back where an action came from: a control of a key's row (found again by
  // client id and label, as the rows are redrawn), else an element, else the API's heading.
  function restoreFocus(back) {
    if (!back) return;
    if (back.clientId && focusInRow(back.clientId, back.label)) return;
    const target = back.element;
    if (target && target.isConnected && target.getClientRects().length > 0) {
      target.focus();
    } else if (!$("api-detail").hidden) {
      $("api-title").focus();
    }
  }

  // -- setting an external key's secret ------------------------------------------------------

  function askSetSecret(key, button) {
    if (!idle()) return;
    const api = state.selected;
    const back = { clientId: key.client_id, label: "Set API Secret for " + key.name };
    setError(key.kind + "-error", "");
    if (!key.has_secret) {
      change(button, async () => {
        try {
          await setSecret(api, key, back);
        } catch (error) {
          if (error.code === "unauthorized" || api !== state.selected) return;
          setError(key.kind + "-error", explain(error, { api, kind: key.kind }));
          if (error.code === "key_not_found") loadApi();
        }
      });
      return;
    }
    confirmDialog({
      title: "Replace the secret of “" + key.name + "”?",
      text: "A new secret is generated and the current one stops working at once: callers " +
        "using it are refused until they get the new one.",
      ok: "Replace secret",
      api,
      back,
      errorId: key.kind + "-error",
      run: (pending) => setSecret(api, key, back, pending),
    });
  }

  async function setSecret(api, key, back, pending = null) {
    const answer = await authorized("PUT", "apis/" + path(api, "keys", key.client_id, "secret"));
    if (api === state.selected) await loadApi();
    if (pending) closeConfirm(pending); // before the secret opens, so as not to take its focus
    // Even if the operator moved on meanwhile: this is the only time it can be shown.
    showSecret(api, key, answer.secret, back);
  }

  // -- the ⋮ menu and deleting keys ----------------------------------------------------------------

  let menuCount = 0;

  function keyMenu(key) {
    const id = "key-menu-" + ++menuCount;
    const button = el("button", {
      type: "button",
      class: "menu-button",
      "aria-haspopup": "menu",
      "aria-expanded": "false",
      "aria-controls": id,
      "aria-label": "Actions for key " + key.name,
      text: "⋮",
    });
    const remove = el("button", { type: "button", role: "menuitem", tabindex: "-1",
      text: "Delete key" });
    const menu = el("ul", { class: "menu", role: "menu", id, "aria-label": "Actions for key " +
      key.name, hidden: "" }, el("li", { role: "none" }, remove));
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
    remove.addEventListener("click", () => {
      close(false);
      askDelete(state.selected, key);
    });
    return el("div", { class: "menu-wrap" }, button, menu);
  }

  function closeMenus() {
    for (const menu of document.querySelectorAll(".menu")) {
      if (!menu.hidden && menu.closeMenu) menu.closeMenu(false);
    }
  }

  function askDelete(api, key) {
    if (!idle()) return;
    confirmDialog({
      title: "Delete key “" + key.name + "”?",
      text: "Callers using the " + KINDS[key.kind].word + " key “" + key.name + "” (client id " +
        key.client_id + ") are refused from their next request. This cannot be undone.",
      ok: "Delete key",
      api,
      back: { clientId: key.client_id, label: "Actions for key " + key.name },
      errorId: key.kind + "-error",
      run: async (pending) => {
        await authorized("DELETE", "apis/" + path(api, "keys", key.client_id));
        if (api === state.selected) await loadApi();
        pending.back = { element: $(key.kind + "-title") }; // its row is gone
        closeConfirm(pending);
        announce("Key “" + key.name + "” deleted.");
      },
    });
  }

  // Ask before a change that cannot be taken back; run(pending) makes it.
  function confirmDialog({ title, text, ok, run, api, back, errorId = null }) {
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = ok;
    setError("confirm-error", "");
    state.confirm = { run, api, back, errorId };
    $("confirm-dialog").showModal();
    $("confirm-cancel").focus(); // the safe choice has the focus
  }

  // Close the confirm dialog if it is still the one this action was confirmed in.
  function closeConfirm(pending) {
    if (state.confirm === pending) $("confirm-dialog").close();
  }

  async function confirmed() {
    const pending = state.confirm;
    if (!pending) return;
    await change($("confirm-ok"), async () => {
      try {
        await pending.run(pending);
      } catch (error) {
        if (error.code === "unauthorized") return;
        if (state.confirm !== pending) {
          // The dialog was closed meanwhile: say it next to the section instead.
          if (pending.errorId && pending.api === state.selected) {
            setError(pending.errorId, explain(error, { api: pending.api }));
          }
          return;
        }
        if (error.code === "key_not_found") {
          closeConfirm(pending);
          await loadApi();
          setPageError(explain(error));
        } else {
          setError("confirm-error", explain(error, { api: pending.api }));
        }
      }
    });
  }

  function confirmClosed() {
    const pending = state.confirm;
    state.confirm = null;
    if (pending) restoreFocus(pending.back);
  }

  // Close the create and confirm dialogs (their subject changed); the secret dialog too only
  // when signing out, since a secret must not vanish before it is copied.
  function closeDialogs(includingSecret) {
    for (const id of ["create-dialog", "confirm-dialog"]) {
      if ($(id).open) $(id).close();
    }
    state.create = null;
    if (includingSecret && $("secret-dialog").open) closeSecret();
  }

  // -- wiring -----------------------------------------------------------------------------------

  function wire() {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    $("add-api-form").addEventListener("submit", addApi);
    $("limit-form").addEventListener("submit", saveLimit);
    $("expose").addEventListener("click", toggleExpose);
    $("delete-api").addEventListener("click", askDeleteApi);
    $("retry").addEventListener("click", retry);
    for (const button of document.querySelectorAll("button.create")) {
      button.addEventListener("click", () => openCreate(button.dataset.kind, button));
    }
    $("create-form").addEventListener("submit", createKey);
    $("create-cancel").addEventListener("click", () => $("create-dialog").close());
    $("create-dialog").addEventListener("close", () => {
      state.create = null;
    });
    $("secret-done").addEventListener("click", closeSecret);
    // Escape must not throw away a secret that may not have been copied yet (closedby="none"
    // says the same to browsers that know it).
    $("secret-dialog").addEventListener("cancel", (event) => event.preventDefault());
    $("secret-dialog").addEventListener("close", secretClosed);
    for (const button of document.querySelectorAll("[data-copy]")) {
      const source = $(button.dataset.copy);
      button.addEventListener("click", () => copy(source.value, button, source));
    }
    $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close());
    $("confirm-ok").addEventListener("click", confirmed);
    $("confirm-dialog").addEventListener("close", confirmClosed);
    document.addEventListener("click", (event) => {
      if (!event.target.closest(".menu-wrap")) closeMenus();
    });
    window.addEventListener("hashchange", () => {
      if (state.token !== null) route({ focus: true, refresh: true });
    });
  }

  async function boot() {
    wire();
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
})();
