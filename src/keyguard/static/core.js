// keyguard console: what every part of the page shares — its state, the calls to the
// management API (SPEC §5), errors in words, and small helpers for building the page.
//
// Every value from the server reaches the page through textContent or an input's value,
// never as markup (the CSP's Trusted Types would refuse markup anyway).

export const KINDS = {
  internal: {
    title: "Sharing within your organization",
    word: "internal",
    create: "For members of your organization: it gets a client id and a secret now, and " +
      "neither can ever change.",
    lost: "replace this key (⋮ → Replace key…).",
  },
  external: {
    title: "Sharing outside your organization",
    word: "external",
    create: "For a customer outside your organization: it gets a client id now; you can set " +
      "a secret for it later with Set API Secret.",
    lost: "use Set API Secret again to replace it.",
  },
};

export const $ = (id) => document.getElementById(id);

export const state = {
  token: null, // null: not signed in; "": the app needs no token (allow_no_auth)
  apis: [],
  apisLoaded: false, // whether state.apis was read (an empty list then means "no APIs")
  selected: null, // the chosen API's name, from the address (#api=...)
  api: null, // the chosen API, as GET /apis/{api} answered
  keys: [], // the chosen API's keys read so far (pages.js keeps them, with the fields below)
  keyReads: [], // the query string of each request that read them (?limit=&after=&name=)
  loads: 0, // numbers every read of the chosen API, so that only the latest is shown
  busy: false, // a change is being saved (one at a time: see change())
  create: null, // {api, kind, opener} while the create dialog is open
  confirm: null, // the pending action while the confirm dialog is open (dialogs.js)
  secretReturn: null, // where focus goes when the secret dialog closes
};

// What the page around the keys provides (console.js fills these in at start), so that the
// key modules can redraw it without importing it back.
export const page = {
  reload: async () => false, // read the chosen API and its keys again, and show them
  error: (message) => undefined, // the banner at the top of the API's page ("" hides it)
  signOut: (message) => undefined,
  readOnly: () => undefined, // the token turned out read-only: turn the changing controls off
};

// -- talking to the management API --------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || code || "HTTP " + status);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

export function path(...parts) {
  return parts.map((part) => encodeURIComponent(part)).join("/");
}

export async function call(method, url, body, token = state.token) {
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

// A call made by a signed-in user: an unaccepted token sends them back to sign in, and a
// change refused as read-only (the server was restarted with this token made ReadOnly)
// turns the page's changing controls off (unless they signed out, or in again, while it
// was on its way).
export async function authorized(method, url, body) {
  const token = state.token;
  if (token === null) throw new ApiError(401, "unauthorized", "");
  try {
    return await call(method, url, body, token);
  } catch (error) {
    if (error.code === "unauthorized" && state.token === token) {
      page.signOut("Your token is no longer accepted. Sign in again.");
    } else if (error.code === "forbidden" && state.token === token) {
      page.readOnly();
    }
    throw error;
  }
}

// The URL of one key (or of something under it) in the chosen API's routes.
export function keyUrl(api, clientId, ...rest) {
  return "apis/" + path(api, "keys", clientId, ...rest);
}

// Words a person understands, for every error the management API can answer.
export function explain(error, context = {}) {
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
    case "forbidden":
      return "Nothing was changed: this token is read-only. It can see everything but change " +
        "nothing; sign in with another token to make changes.";
    case "invalid_request":
      return "That was not accepted: " + (error.detail || "the request was invalid") + ".";
    default:
      return "Something went wrong (HTTP " + error.status + "). " +
        (error.detail ? error.detail + ". " : "") + "Try again; if it persists, see the " +
        "server's log.";
  }
}

export function retryable(error) {
  return error.code === "network" || error.code === "store_unavailable" || error.status >= 500;
}

// A value typed into a dialog that the page itself refuses, before asking the server.
export class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

// -- small helpers for the page -----------------------------------------------------------

export function el(tag, attributes = {}, ...children) {
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

export function hiddenText(text) {
  return el("span", { class: "visually-hidden", text });
}

export function show(node, visible) {
  node.hidden = !visible;
}

export function setError(id, message) {
  const node = $(id);
  node.textContent = message || "";
  show(node, Boolean(message));
}

// Say what is wrong with a field, next to it, and put the cursor there.
export function invalid(field, errorId, message) {
  setError(errorId, message);
  field.setAttribute("aria-invalid", "true");
  field.focus();
}

export function announce(message) {
  const node = $("announcer");
  node.textContent = "";
  // A fresh text node a moment later, so that screen readers announce a repeat too.
  setTimeout(() => {
    node.textContent = message;
  }, 50);
}

// Run an action from a button, which is disabled meanwhile (no double submit) and keeps
// the keyboard focus it had, even if the page was redrawn around it.
export async function withBusy(button, action) {
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
export async function change(button, action) {
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
export function idle() {
  if (state.busy) announce("Wait a moment: the last change is still being saved.");
  return !state.busy;
}

export async function copy(text, button, source) {
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
