// keyguard console: what can be done to a key — create it, set its secret (with a grace
// period), delete it, disable or enable it, rename it, and replace an internal key. Its
// expiry and meta have their own dialogs, in edits.js.

import {
  $, FieldError, KINDS, announce, authorized, change, el, explain, idle, invalid, keyUrl,
  page, path, setError, state,
} from "./core.js";
import { closeConfirm, confirmDialog, focusInRow, showSecret } from "./dialogs.js";
import { GRACES, formatDateTime, isPast, later } from "./times.js";

const NAME_HINT = "1 to 100 characters, unique within this API (ignoring case).";

// -- creating keys -----------------------------------------------------------------------------

export function openCreate(kind, opener) {
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

export async function createKey(event) {
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
      if (api === state.selected) await page.reload();
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
        page.reload(); // the counts or the switch were out of date
      }
    }
  });
}

// -- fields of the confirm dialog ---------------------------------------------------------------

let fieldCount = 0;

// A labelled control for the confirm dialog, with an optional hint under it.
export function field(label, control, hint = "") {
  const id = "action-field-" + ++fieldCount;
  control.id = id;
  const described = ["confirm-error"];
  const parts = [el("label", { for: id, text: label }), control];
  if (hint) {
    parts.push(el("p", { class: "hint", id: id + "-hint", text: hint }));
    described.unshift(id + "-hint");
  }
  control.setAttribute("aria-describedby", described.join(" "));
  control.setAttribute("aria-invalid", "false");
  return parts;
}

function graceSelect(chosen) {
  return el("select", {}, ...GRACES.map(({ seconds, label }) => {
    const option = el("option", { value: String(seconds), text: label });
    option.selected = seconds === chosen;
    return option;
  }));
}

function textInput(value, attributes = {}) {
  const input = el("input", { type: "text", autocomplete: "off", spellcheck: "false",
    ...attributes });
  input.value = value;
  return input;
}

// -- setting an external key's secret ----------------------------------------------------

export function askSetSecret(key, button) {
  if (!idle()) return;
  const api = state.selected;
  const back = { clientId: key.client_id, label: "Set API Secret for " + key.name };
  setError(key.kind + "-error", "");
  if (!key.has_secret) {
    change(button, async () => {
      try {
        await setSecret(api, key, back, 0);
      } catch (error) {
        if (error.code === "unauthorized" || api !== state.selected) return;
        setError(key.kind + "-error", explain(error, { api, kind: key.kind }));
        if (error.code === "key_not_found") page.reload();
      }
    });
    return;
  }
  const grace = graceSelect(0);
  const text = () => Number(grace.value) === 0
    ? "A new secret is generated and the current one stops working at once: callers using " +
      "it are refused until they get the new one."
    : "A new secret is generated; the current one keeps working for " +
      grace.selectedOptions[0].textContent + ", so callers have time to switch to the new one.";
  grace.addEventListener("change", () => {
    $("confirm-text").textContent = text();
  });
  confirmDialog({
    title: "Replace the secret of “" + key.name + "”?",
    text: text(),
    fields: field("Keep the current secret working for", grace,
      "A grace period (at most 30 days) lets callers move to the new secret without a gap."),
    ok: "Replace secret",
    api,
    back,
    errorId: key.kind + "-error",
    run: (pending) => setSecret(api, key, back, Number(grace.value), pending),
  });
}

async function setSecret(api, key, back, grace, pending = null) {
  const body = grace > 0 ? { grace_seconds: grace } : undefined;
  const answer = await authorized("PUT", keyUrl(api, key.client_id, "secret"), body);
  if (api === state.selected) await page.reload();
  if (pending) closeConfirm(pending); // before the secret opens, so as not to take its focus
  const previous = answer.previous_secret_expires_at;
  // Even if the operator moved on meanwhile: this is the only time it can be shown.
  showSecret(api, key, answer.secret, back,
    previous ? "Previous secret valid until " + formatDateTime(previous) + "." : "");
}

// -- deleting, disabling and enabling ------------------------------------------------------

export function askDelete(api, key, back) {
  if (!idle()) return;
  confirmDialog({
    title: "Delete key “" + key.name + "”?",
    text: "Callers using the " + KINDS[key.kind].word + " key “" + key.name + "” (client id " +
      key.client_id + ") are refused from their next request. This cannot be undone.",
    ok: "Delete key",
    api,
    back,
    errorId: key.kind + "-error",
    run: async (pending) => {
      await authorized("DELETE", keyUrl(api, key.client_id));
      if (api === state.selected) await page.reload();
      pending.back = { element: $(key.kind + "-title") }; // its row is gone
      closeConfirm(pending);
      announce("Key “" + key.name + "” deleted.");
    },
  });
}

// Change some of a key's fields (PATCH), then show the list as it now is.
export async function patchKey(api, key, changes) {
  const changed = await authorized("PATCH", keyUrl(api, key.client_id), changes);
  if (api === state.selected) await page.reload();
  return changed;
}

// Disabling refuses every caller of the key at once, so it asks first; enabling does not.
export function askDisable(key, back) {
  if (!idle()) return;
  const api = state.selected;
  confirmDialog({
    title: "Disable key “" + key.name + "”?",
    text: "Callers using it are refused from their next request, until you enable it again. " +
      "The key keeps its client id and its secret.",
    ok: "Disable key",
    api,
    back,
    errorId: key.kind + "-error",
    run: async (pending) => {
      await patchKey(api, key, { enabled: false });
      closeConfirm(pending);
      announce("Key “" + key.name + "” disabled.");
    },
  });
}

export function enable(key, button, back) {
  if (!idle()) return;
  const api = state.selected;
  setError(key.kind + "-error", "");
  change(button, async () => {
    try {
      await patchKey(api, key, { enabled: true });
      announce("Key “" + key.name + "” enabled.");
    } catch (error) {
      if (error.code === "unauthorized" || api !== state.selected) return;
      setError(key.kind + "-error", explain(error, { api }));
      if (error.code === "key_not_found") page.reload();
    }
    focusInRow(back.clientId, back.label);
  });
}

// -- renaming -----------------------------------------------------------------------------------

export function askRename(key, back) {
  if (!idle()) return;
  const api = state.selected;
  const input = textInput(key.name, { maxlength: "200" });
  let name = key.name;
  confirmDialog({
    title: "Rename key “" + key.name + "”",
    text: "Its client id and secret stay the same; only the label changes.",
    fields: field("New name", input, NAME_HINT),
    ok: "Rename",
    tone: "primary",
    focus: input,
    field: input,
    api,
    back,
    errorId: key.kind + "-error",
    words: (error) => explain(error, { api, name }),
    run: async (pending) => {
      name = input.value.trim();
      if (!name) throw new FieldError(input, "Enter a name for the key.");
      const renamed = await patchKey(api, key, { name });
      pending.back = { clientId: key.client_id, label: "Actions for key " + renamed.name };
      closeConfirm(pending);
      announce("Key “" + key.name + "” renamed to “" + renamed.name + "”.");
    },
  });
  input.select();
}

// -- replacing an internal key ----------------------------------------------------------

// An internal key's secret never changes (R4): its rotation is a new internal key, and an
// expiry on the old one after a grace period (SPEC §8), made here in one step.
export function askReplace(key, back) {
  if (!idle()) return;
  const api = state.selected;
  const input = textInput((key.name.slice(0, 94) + " (new)"), { maxlength: "200" });
  const grace = graceSelect(7 * 86400);
  let name = "";
  confirmDialog({
    title: "Replace key “" + key.name + "”?",
    text: "A new internal key is created, with its own client id and secret (shown once) and " +
      "the same metadata and rate limits. The old key then expires: it keeps working for the " +
      "time you choose, so that its users can switch.",
    fields: [
      ...field("Name of the new key", input, NAME_HINT),
      ...field("The old key keeps working for", grace),
    ],
    ok: "Replace key",
    tone: "primary",
    focus: input,
    field: input,
    api,
    back,
    errorId: key.kind + "-error",
    words: (error) => error.code === "key_limit_reached"
      ? explain(error, { api, kind: "internal" }) + " Replacing a key needs room for one " +
        "more while the old one still works."
      : explain(error, { api, name }),
    run: async (pending) => {
      name = input.value.trim();
      if (!name) throw new FieldError(input, "Enter a name for the new key.");
      await replace(api, key, name, Number(grace.value), pending);
    },
  });
  input.select();
}

async function replace(api, key, name, grace, pending) {
  const body = { name, kind: "internal" };
  if (key.meta && Object.keys(key.meta).length > 0) body.meta = key.meta;
  if (key.rate_limits) body.rate_limits = key.rate_limits;
  const created = await authorized("POST", "apis/" + path(api, "keys"), body);
  // From here on the new secret exists and must be shown, whatever else fails.
  let until = later(grace);
  let failure = null;
  if (key.expires_at && new Date(key.expires_at) <= new Date(until)) {
    until = key.expires_at; // it already expires sooner: an expiry is never pushed back
  } else {
    try {
      await authorized("PATCH", keyUrl(api, key.client_id), { expires_at: until });
    } catch (error) {
      failure = error;
    }
  }
  if (api === state.selected) await page.reload();
  closeConfirm(pending);
  const old = "The old key “" + key.name + "”";
  const note = failure
    ? old + " could not be given an expiry (" + explain(failure, { api }) + ") It still " +
      "works: set its expiry with ⋮ → Set or clear expiry."
    : old + (isPast(until) ? " has expired: it works no more."
      : " keeps working until " + formatDateTime(until) + ".");
  showSecret(api, created, created.secret,
    { clientId: created.client_id, label: "Actions for key " + created.name }, note);
  if (failure && api === state.selected) setError("internal-error", note);
}
