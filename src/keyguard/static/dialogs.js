// keyguard console: the two shared dialogs — the one that shows a secret once, and the one
// that asks before a change (optionally with fields: a name, a time, a grace period…) — and
// where the keyboard focus goes when they close.

import {
  $, FieldError, KINDS, change, explain, page, setError, state,
} from "./core.js";

// -- the secret, shown once ----------------------------------------------------------------

// The one moment a secret is on screen. However the dialog closes, its "close" handler
// wipes the secret from the page. ``note`` says what else changed (an old secret or key
// that keeps working for a while).
export function showSecret(api, key, secret, back, note = "") {
  $("secret-key").textContent = "The " + KINDS[key.kind].word + " key “" + key.name +
    "” of the API “" + api + "”";
  $("secret-lost").textContent = KINDS[key.kind].lost;
  $("secret-note").textContent = note;
  $("secret-note").hidden = !note;
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

// -- where the focus goes back to ----------------------------------------------------------

// Focus a control of a key's row: the one with this label, else the row's first button.
export function focusInRow(clientId, label) {
  const row = document.querySelector("tr[data-client-id=\"" + CSS.escape(clientId) + "\"]");
  if (!row) return false;
  const target = (label && row.querySelector("[aria-label=\"" + CSS.escape(label) + "\"]")) ||
    row.querySelector("button");
  if (target) target.focus();
  return Boolean(target);
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

// -- asking first ----------------------------------------------------------------------------

// Ask before a change; run(pending) makes it, and may throw a FieldError for a value the
// page refuses itself. ``fields`` are nodes shown between the text and the buttons (labels
// and inputs built by the caller); ``focus`` is where the cursor starts (else Cancel, the
// safe choice); ``field`` (or the one ``field()`` returns, for dialogs whose fields come and
// go) is marked invalid when the server refuses its value;
// ``words(error)`` explains a server error in the action's own terms.
export function confirmDialog({
  title, text, ok, run, api, back, errorId = null, fields = [], tone = "danger", focus = null,
  field = null, words = null,
}) {
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-fields").replaceChildren(...fields);
  $("confirm-ok").textContent = ok;
  $("confirm-ok").className = tone;
  setError("confirm-error", "");
  state.confirm = { run, api, back, errorId, field, words };
  $("confirm-dialog").showModal();
  (focus || $("confirm-cancel")).focus();
}

// Close the confirm dialog if it is still the one this action was confirmed in.
export function closeConfirm(pending) {
  if (state.confirm === pending) $("confirm-dialog").close();
}

function inWords(pending, error) {
  return (pending.words && pending.words(error)) || explain(error, { api: pending.api });
}

async function confirmed(event) {
  event.preventDefault();
  const pending = state.confirm;
  if (!pending) return;
  for (const input of $("confirm-fields").querySelectorAll("[aria-invalid]")) {
    input.setAttribute("aria-invalid", "false");
  }
  await change($("confirm-ok"), async () => {
    try {
      await pending.run(pending);
    } catch (error) {
      if (error instanceof FieldError) {
        setError("confirm-error", error.message);
        error.field.setAttribute("aria-invalid", "true");
        error.field.focus();
        return;
      }
      if (error.code === "unauthorized") return;
      if (state.confirm !== pending) {
        // The dialog was closed meanwhile: say it next to the section instead.
        if (pending.errorId && pending.api === state.selected) {
          setError(pending.errorId, inWords(pending, error));
        }
        return;
      }
      if (error.code === "key_not_found") {
        closeConfirm(pending);
        await page.reload();
        page.error(explain(error));
        return;
      }
      setError("confirm-error", inWords(pending, error));
      const refused = typeof pending.field === "function" ? pending.field() : pending.field;
      if (refused && (error.code === "invalid_request" || error.code === "duplicate_name")) {
        refused.setAttribute("aria-invalid", "true");
        refused.focus();
      }
    }
  });
}

function confirmClosed() {
  const pending = state.confirm;
  state.confirm = null;
  $("confirm-fields").replaceChildren();
  if (pending) restoreFocus(pending.back);
}

// Close the create and confirm dialogs (their subject changed); the secret dialog too only
// when signing out, since a secret must not vanish before it is copied.
export function closeDialogs(includingSecret) {
  for (const id of ["create-dialog", "confirm-dialog"]) {
    if ($(id).open) $(id).close();
  }
  state.create = null;
  if (includingSecret && $("secret-dialog").open) closeSecret();
}

export function wireDialogs() {
  $("secret-done").addEventListener("click", closeSecret);
  // Escape must not throw away a secret that may not have been copied yet (closedby="none"
  // says the same to browsers that know it).
  $("secret-dialog").addEventListener("cancel", (event) => event.preventDefault());
  $("secret-dialog").addEventListener("close", secretClosed);
  $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close());
  $("confirm-form").addEventListener("submit", confirmed);
  $("confirm-dialog").addEventListener("close", confirmClosed);
}
