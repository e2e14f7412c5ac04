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
      create: "An internal key, for members of your organization: it gets a client id and a " +
        "secret now, and neither can ever change.",
      lost: "delete this key and create a new one.",
    },
    external: {
      title: "Sharing outside your organization",
      word: "external",
      create: "An external key, for a customer outside your organization: it gets a client " +
        "id now; you can set a secret for it later with Set API Secret.",
      lost: "use Set API Secret again to replace it.",
    },
  };

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null, // null: not signed in yet; "": the app needs no token (allow_no_auth)
    apis: [],
    api: null, // the chosen API's object, as GET /apis/{api} answers
    keys: [],
    selected: null, // the chosen API's name (from the address's #api=...)
    pendingCreate: null, // the kind of key the create dialog is for
    confirmAction: null,
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

  // A call made by a signed-in user: an unaccepted token sends them back to sign in.
  async function authorized(method, url, body) {
    try {
      return await call(method, url, body);
    } catch (error) {
      if (error.code === "unauthorized") {
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
        const limit = state.api ? state.api.max_keys_per_kind : null;
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

  function show(node, visible) {
    node.hidden = !visible;
  }

  function setError(id, message) {
    const node = $(id);
    node.textContent = message || "";
    show(node, Boolean(message));
  }

  function announce(message) {
    const node = $("announcer");
    node.textContent = "";
    // A fresh text node a moment later, so that screen readers announce a repeat too.
    setTimeout(() => {
      node.textContent = message;
    }, 50);
  }

  async function copy(text, button) {
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (error) {
      done = false;
    }
    if (!done) {
      // Without the clipboard API (not a secure context), select the text for Ctrl+C.
      const input = button.previousElementSibling;
      if (input && input.select) input.select();
    }
    const label = button.textContent;
    button.textContent = done ? "Copied" : "Press Ctrl+C";
    announce(done ? "Copied to the clipboard." : "Selected: press Ctrl+C to copy.");
    setTimeout(() => {
      button.textContent = label;
    }, 2000);
  }

  function formatDate(value) {
    const date = new Date(value);
    if (Number.isNaN(date.getTime())) return value;
    return date.toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
  }

  function busy(button, isBusy) {
    button.disabled = isBusy;
    button.setAttribute("aria-busy", String(isBusy));
  }

  // -- signing in and out -----------------------------------------------------------------------

  function showOnly(id) {
    for (const section of ["loading", "sign-in", "console"]) show($(section), section === id);
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    closeAllDialogs();
    show($("sign-out"), false);
    showOnly("sign-in");
    $("token").value = "";
    setError("sign-in-error", message || "");
    $("token").setAttribute("aria-invalid", message ? "true" : "false");
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) {
      setError("sign-in-error", "Enter the management token.");
      $("token").setAttribute("aria-invalid", "true");
      $("token").focus();
      return;
    }
    const button = event.submitter || $("sign-in-form").querySelector("button");
    busy(button, true);
    try {
      await start(token);
    } catch (error) {
      setError("sign-in-error", error.code === "unauthorized"
        ? "That token was not accepted. Check it and try again." : explain(error));
      $("token").setAttribute("aria-invalid", "true");
      $("token").focus();
    } finally {
      busy(button, false);
    }
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
      renderApiList();
    }
    await route(failure);
  }

  // -- the list of APIs -----------------------------------------------------------------------

  function renderApiList() {
    const list = $("api-list");
    list.replaceChildren(
      ...state.apis.map((api) => {
        const link = el("a", { href: "#api=" + encodeURIComponent(api.name) },
          el("span", { class: "api-name", text: api.name }),
          el("span", { class: "pill" + (api.exposed ? " on" : ""),
            text: api.exposed ? "Exposed" : "Not exposed" }));
        if (api.name === state.selected) link.setAttribute("aria-current", "page");
        return el("li", {}, link);
      }),
    );
    show($("apis-empty"), state.apis.length === 0);
  }

  async function refreshApiList() {
    state.apis = (await authorized("GET", "apis")).apis;
    renderApiList();
  }

  async function addApi(event) {
    event.preventDefault();
    const input = $("new-api");
    const name = input.value.trim();
    if (!API_NAME.test(name)) {
      setError("add-api-error", name
        ? "“" + name + "” is not a valid API name: use letters, digits, dot, dash and " +
          "underscore, starting with a letter or digit, up to 64 characters."
        : "Enter a name for the API.");
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    const button = event.submitter || $("add-api-form").querySelector("button");
    busy(button, true);
    try {
      // An empty object only creates the API (not exposed), like the gateway's new API.
      await authorized("PUT", "apis/" + path(name), {});
      input.value = "";
      input.setAttribute("aria-invalid", "false");
      setError("add-api-error", "");
      await refreshApiList();
      announce("API “" + name + "” added.");
      location.hash = "api=" + encodeURIComponent(name);
    } catch (error) {
      setError("add-api-error", explain(error, { api: name }));
    } finally {
      busy(button, false);
    }
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

  async function route(failure) {
    state.selected = selectedFromAddress();
    renderApiList();
    closeMenus();
    if (failure) {
      pageError(failure);
      return;
    }
    setPageError("");
    if (!state.selected) {
      state.api = null;
      show($("api-detail"), false);
      show($("no-api"), true);
      return;
    }
    show($("no-api"), false);
    await loadApi();
  }

  async function loadApi() {
    const name = state.selected;
    try {
      const [api, keys] = await Promise.all([
        authorized("GET", "apis/" + path(name)),
        authorized("GET", "apis/" + path(name, "keys")),
      ]);
      if (name !== state.selected) return; // the user moved on meanwhile
      state.api = api;
      state.keys = keys.keys;
      setPageError("");
      renderApi();
    } catch (error) {
      if (error.code === "unauthorized") return;
      if (error.code === "api_not_found") {
        state.api = null;
        show($("api-detail"), false);
      }
      pageError(error, { api: name });
    }
  }

  function setPageError(message) {
    $("page-error-text").textContent = message;
    show($("page-error"), Boolean(message));
  }

  function pageError(error, context) {
    setPageError(explain(error, context));
    // Retrying only helps when the failure was temporary.
    show($("retry"), ["network", "store_unavailable"].includes(error.code) || error.status >= 500);
  }

  async function retry() {
    const button = $("retry");
    busy(button, true);
    try {
      await refreshApiList();
      await route();
    } catch (error) {
      if (error.code !== "unauthorized") pageError(error);
    } finally {
      busy(button, false);
    }
  }

  function renderApi() {
    const api = state.api;
    show($("api-detail"), true);
    $("api-title").textContent = api.name;
    document.title = api.name + " · Sharing & keys · keyguard";
    const expose = $("expose");
    expose.setAttribute("aria-checked", String(api.exposed));
    $("expose-state").textContent = api.exposed ? "On" : "Off";
    show($("not-exposed"), !api.exposed);
    const limit = $("limit");
    if (document.activeElement !== limit) limit.value = String(api.max_keys_per_kind);
    for (const kind of Object.keys(KINDS)) renderKind(kind);
    // Keep the list's counts and exposed flags in step with what was just read.
    const index = state.apis.findIndex((item) => item.name === api.name);
    if (index >= 0) state.apis[index] = api;
    else state.apis.push(api);
    renderApiList();
  }

  function renderKind(kind) {
    const api = state.api;
    const keys = state.keys.filter((key) => key.kind === kind);
    const count = api.keys[kind];
    const counter = $(kind + "-count");
    counter.textContent = count + " of " + api.max_keys_per_kind;
    counter.setAttribute("aria-label", count + " of " + api.max_keys_per_kind + " " +
      KINDS[kind].word + " keys used");
    const holder = $(kind + "-keys");
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
      header(el("span", { class: "visually-hidden", text: "Actions" }))));
    const body = el("tbody", { role: "rowgroup" }, ...keys.map((key) => keyRow(key)));
    holder.replaceChildren(el("table", { class: "keys", role: "table" },
      el("caption", { class: "visually-hidden", text: KINDS[kind].title + ": keys" }),
      head, body));
  }

  function keyRow(key) {
    const idCode = el("code", { text: key.client_id });
    const copyId = el("button", {
      type: "button",
      class: "small copy",
      "aria-label": "Copy the client ID of " + key.name,
      text: "Copy",
      onclick: (event) => copy(key.client_id, event.currentTarget),
    });
    const secret = el("div", { class: "secret-cell" },
      el("span", { text: key.has_secret ? "Yes" : "No" }));
    if (key.kind === "external") {
      secret.append(el("button", {
        type: "button",
        class: "small",
        "aria-label": "Set API Secret for " + key.name,
        text: "Set API Secret",
        onclick: () => askSetSecret(key),
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

  // -- the expose switch and the limit ---------------------------------------------------------

  async function toggleExpose() {
    const button = $("expose");
    const exposed = button.getAttribute("aria-checked") !== "true";
    busy(button, true);
    try {
      state.api = await authorized("PUT", "apis/" + path(state.selected), { exposed });
      setPageError("");
      renderApi();
      announce("“" + state.selected + "” is " + (exposed ? "exposed." : "no longer exposed."));
    } catch (error) {
      if (error.code !== "unauthorized") pageError(error);
    } finally {
      busy(button, false);
      button.focus();
    }
  }

  async function saveLimit(event) {
    event.preventDefault();
    const input = $("limit");
    const value = input.value.trim();
    const limit = Number(value);
    if (!/^\d+$/.test(value) || limit > 1000) {
      setError("limit-error", "Enter a whole number from 0 to 1000.");
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    const button = event.submitter || $("limit-form").querySelector("button");
    busy(button, true);
    try {
      state.api = await authorized("PUT", "apis/" + path(state.selected),
        { max_keys_per_kind: limit });
      input.setAttribute("aria-invalid", "false");
      setError("limit-error", "");
      renderApi();
      announce("Up to " + limit + " keys of each kind allowed.");
    } catch (error) {
      if (error.code !== "unauthorized") setError("limit-error", explain(error));
    } finally {
      busy(button, false);
    }
  }

  // -- creating keys ----------------------------------------------------------------------------

  function openCreate(kind) {
    state.pendingCreate = kind;
    $("create-title").textContent = "Create an " + KINDS[kind].word + " API key";
    $("create-kind").textContent = KINDS[kind].create;
    $("key-name").value = "";
    $("key-name").setAttribute("aria-invalid", "false");
    setError("create-error", "");
    setError(kind + "-error", "");
    $("create-dialog").showModal();
    $("key-name").focus();
  }

  async function createKey(event) {
    event.preventDefault();
    const kind = state.pendingCreate;
    const input = $("key-name");
    const name = input.value.trim();
    if (!name) {
      setError("create-error", "Enter a name for the key.");
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    const button = $("create-save");
    busy(button, true);
    try {
      const key = await authorized("POST", "apis/" + path(state.selected, "keys"), { name, kind });
      $("create-dialog").close();
      await loadApi();
      if (key.secret) {
        showSecret(key, key.secret);
      } else {
        announce("External key “" + key.name + "” created. It has no secret yet.");
        focusRow(key.client_id);
      }
    } catch (error) {
      if (error.code === "unauthorized") return;
      setError("create-error", explain(error, { kind, name }));
      input.setAttribute("aria-invalid", String(error.code === "duplicate_name" ||
        error.code === "invalid_request"));
      input.focus();
      if (error.code === "key_limit_reached" || error.code === "api_not_exposed") {
        loadApi(); // the counts or the switch were out of date
      }
    } finally {
      busy(button, false);
    }
  }

  function focusRow(clientId) {
    const row = document.querySelector("tr[data-client-id=\"" + CSS.escape(clientId) + "\"]");
    const target = row && row.querySelector("button");
    if (target) target.focus();
  }

  // The one moment a secret is on screen; closing the dialog wipes it from the page.
  function showSecret(key, secret) {
    $("secret-key").textContent = "Key “" + key.name + "” (" + KINDS[key.kind].word + ")";
    $("secret-lost").textContent = KINDS[key.kind].lost;
    $("secret-client-id").value = key.client_id;
    $("secret-value").value = secret;
    state.secretFor = key.client_id;
    $("secret-dialog").showModal();
    $("secret-value").focus();
    $("secret-value").select();
  }

  function closeSecret() {
    $("secret-value").value = "";
    $("secret-client-id").value = "";
    $("secret-dialog").close();
    const clientId = state.secretFor;
    state.secretFor = null;
    if (clientId) focusRow(clientId);
  }

  // -- setting an external key's secret ------------------------------------------------------

  function askSetSecret(key) {
    setError(key.kind + "-error", "");
    if (!key.has_secret) {
      setSecret(key);
      return;
    }
    confirmDialog({
      title: "Replace the secret of “" + key.name + "”?",
      text: "A new secret is generated and the current one stops working at once: callers " +
        "using it are refused until they get the new one.",
      ok: "Replace secret",
      run: () => setSecret(key, true),
    });
  }

  async function setSecret(key, fromDialog = false) {
    try {
      const answer = await authorized("PUT",
        "apis/" + path(state.selected, "keys", key.client_id, "secret"));
      if (fromDialog) $("confirm-dialog").close();
      await loadApi();
      showSecret(key, answer.secret);
    } catch (error) {
      if (error.code === "unauthorized") return;
      if (fromDialog) throw error;
      setError(key.kind + "-error", explain(error, { kind: key.kind }));
      if (error.code === "key_not_found") loadApi();
    }
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
      askDelete(key, button);
    });
    return el("div", { class: "menu-wrap" }, button, menu);
  }

  function closeMenus() {
    for (const menu of document.querySelectorAll(".menu")) {
      if (!menu.hidden && menu.closeMenu) menu.closeMenu(false);
    }
  }

  function askDelete(key, opener) {
    confirmDialog({
      title: "Delete key “" + key.name + "”?",
      text: "Callers using the " + KINDS[key.kind].word + " key “" + key.name + "” (client id " +
        key.client_id + ") are refused from their next request. This cannot be undone.",
      ok: "Delete key",
      opener,
      run: async () => {
        await authorized("DELETE", "apis/" + path(state.selected, "keys", key.client_id));
        $("confirm-dialog").close();
        await loadApi();
        announce("Key “" + key.name + "” deleted.");
        $(key.kind + "-title").focus();
      },
    });
  }

  function confirmDialog({ title, text, ok, run, opener }) {
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = ok;
    setError("confirm-error", "");
    state.confirmAction = run;
    state.confirmOpener = opener || document.activeElement;
    $("confirm-dialog").showModal();
    $("confirm-cancel").focus(); // the safe choice has the focus
  }

  async function confirmed() {
    const button = $("confirm-ok");
    busy(button, true);
    try {
      await state.confirmAction();
    } catch (error) {
      if (error.code === "unauthorized") return;
      setError("confirm-error", explain(error));
      if (error.code === "key_not_found") {
        $("confirm-dialog").close();
        await loadApi();
        setPageError(explain(error));
      }
    } finally {
      busy(button, false);
    }
  }

  function closeAllDialogs() {
    for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
    $("secret-value").value = "";
  }

  // -- wiring -----------------------------------------------------------------------------------

  function wire() {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    $("add-api-form").addEventListener("submit", addApi);
    $("limit-form").addEventListener("submit", saveLimit);
    $("expose").addEventListener("click", toggleExpose);
    $("retry").addEventListener("click", retry);
    for (const button of document.querySelectorAll("button.create")) {
      button.addEventListener("click", () => openCreate(button.dataset.kind));
    }
    $("create-form").addEventListener("submit", createKey);
    $("create-cancel").addEventListener("click", () => $("create-dialog").close());
    $("secret-done").addEventListener("click", closeSecret);
    // Escape must not throw away a secret that may not have been copied yet.
    $("secret-dialog").addEventListener("cancel", (event) => event.preventDefault());
    for (const button of document.querySelectorAll("[data-copy]")) {
      button.addEventListener("click", () => copy($(button.dataset.copy).value, button));
    }
    $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close());
    $("confirm-ok").addEventListener("click", confirmed);
    $("confirm-dialog").addEventListener("close", () => {
      const opener = state.confirmOpener;
      state.confirmAction = null;
      state.confirmOpener = null;
      if (opener && opener.isConnected) opener.focus();
    });
    document.addEventListener("click", (event) => {
      if (!event.target.closest(".menu-wrap")) closeMenus();
    });
    window.addEventListener("hashchange", () => {
      if (state.token !== null) route();
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
