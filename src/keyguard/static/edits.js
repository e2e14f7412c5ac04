// keyguard console: a key's expiry and its meta, each edited in the confirm dialog (SPEC §8).

import { FieldError, announce, el, idle, state } from "./core.js";
import { closeConfirm, confirmDialog } from "./dialogs.js";
import { field, patchKey } from "./actions.js";
import {
  formatDateTime, fromLocalInput, isPast, later, toLocalInput, when,
} from "./times.js";

const QUICK_DAYS = [7, 30, 90];

// -- the expiry ----------------------------------------------------------------------------

function expiryNow(key) {
  if (!key.expires_at) return "It never expires.";
  const date = formatDateTime(key.expires_at);
  if (isPast(key.expires_at)) return "It expired on " + date + ".";
  const near = when(key.expires_at);
  return "It expires on " + date + (near.startsWith("on ") ? "." : " (" + near + ").");
}

export function askExpiry(key, back) {
  if (!idle()) return;
  const api = state.selected;
  const input = el("input", { type: "datetime-local" });
  input.value = toLocalInput(key.expires_at);
  // Quick choices fill the field, so that what is saved is always what the field shows.
  const choose = (value, said) => {
    input.value = value;
    input.setAttribute("aria-invalid", "false");
    announce(said);
  };
  const quick = el("div", { class: "quick", role: "group", "aria-label": "Quick choices" },
    el("button", { type: "button", class: "small", text: "Never",
      onclick: () => choose("", "The field is empty: the key will never expire.") }),
    ...QUICK_DAYS.map((days) => el("button", {
      type: "button",
      class: "small",
      text: "In " + days + " days",
      onclick: () => {
        const value = toLocalInput(later(days * 86400));
        choose(value, "Expiry set to " + formatDateTime(fromLocalInput(value)) + " in the " +
          "field. Save to keep it.");
      },
    })));
  confirmDialog({
    title: "Expiry of key “" + key.name + "”",
    text: expiryNow(key) + " From its expiry on, the key admits no request; its client id " +
      "and secret are kept.",
    fields: [
      ...field("Expires at (your local time)", input, "Leave it empty (or choose Never) for " +
        "a key that never expires. A time in the past expires the key at once."),
      quick,
    ],
    ok: "Save expiry",
    tone: "primary",
    focus: input,
    field: input,
    api,
    back,
    errorId: key.kind + "-error",
    run: async (pending) => {
      // An unfinished date reads as "" too; it must not clear the expiry by surprise.
      if (input.validity.badInput) {
        throw new FieldError(input, "Complete the date and time, or choose Never.");
      }
      const expires = input.value ? fromLocalInput(input.value) : null;
      if (input.value && !expires) {
        throw new FieldError(input, "Enter a date and time, such as 31/12/2030 23:59.");
      }
      await patchKey(api, key, { expires_at: expires });
      closeConfirm(pending);
      announce(expires ? "Key “" + key.name + "” expires on " + formatDateTime(expires) + "."
        : "Key “" + key.name + "” never expires now.");
    },
  });
}

// -- the meta --------------------------------------------------------------------------------

export function askMeta(key, back) {
  if (!idle()) return;
  const api = state.selected;
  const meta = key.meta && typeof key.meta === "object" ? key.meta : {};
  const area = el("textarea", { rows: "8", spellcheck: "false", class: "mono" });
  area.value = Object.keys(meta).length ? JSON.stringify(meta, null, 2) : "{}";
  confirmDialog({
    title: "Metadata of key “" + key.name + "”",
    text: "A JSON object your app receives with every request of this key (a customer id, " +
      "a plan name). It is replaced as a whole.",
    fields: field("Metadata (JSON)", area, "For example {\"plan\": \"gold\"}: at most 4,096 " +
      "bytes. Empty means {}."),
    ok: "Save metadata",
    tone: "primary",
    focus: area,
    field: area,
    api,
    back,
    errorId: key.kind + "-error",
    run: async (pending) => {
      const text = area.value.trim();
      let value = {};
      if (text) {
        try {
          value = JSON.parse(text);
        } catch (error) {
          throw new FieldError(area, "That is not valid JSON: " + error.message + ".");
        }
      }
      if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw new FieldError(area, "The metadata must be a JSON object, in braces, such as " +
          "{\"plan\": \"gold\"}.");
      }
      // Its size is the server's rule, and its answer says it.
      await patchKey(api, key, { meta: value });
      closeConfirm(pending);
      announce("Metadata of key “" + key.name + "” saved.");
    },
  });
}
