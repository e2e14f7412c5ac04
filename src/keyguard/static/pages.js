// keyguard console: an API's keys a page at a time (SPEC §5's ?limit=&after=&name=), the
// "Show more keys" button and the search by name, filtered by the server.
//
// state.keys holds the keys read so far (oldest first, both kinds), state.keysNext the
// cursor of the next page (null: every key is shown), state.keyFilter the search text and
// state.keyReads the query of each request that read them, so that usage.js reads the
// totals of exactly those pages. A reload (after a change, or coming back to the tab) reads
// again as many keys as were shown, so that the page does not shrink under the operator.

import { $, authorized, announce, el, explain, page, path, state, withBusy } from "./core.js";
import { loadMoreTotals } from "./usage.js";

export const PAGE_SIZE = 100; // keys per "Show more keys"
const MAX_LIMIT = 1000; // the most one request may ask for (SPEC §5)
const MAX_CALLS = 20; // a filtered read stops after this many partial pages (Redis)
const DEBOUNCE_MS = 300;

let shownApi = null; // the API the search and the page count belong to
let wanted = PAGE_SIZE; // how many keys the operator asked to see
let timer = null;

// Read the keys of the API ``name`` to show: ``wanted`` of them from the start, with the
// search applied. Answers {keys, next, reads}; the caller keeps them if still current.
export async function loadKeys(name) {
  if (name !== shownApi) {
    shownApi = name;
    wanted = PAGE_SIZE;
    state.keyFilter = "";
    const box = $("key-search");
    if (box) box.value = "";
  }
  return readKeys(name, null, wanted, state.keyFilter);
}

// Up to ``count`` keys of ``name`` after the cursor ``after``, a request of at most 1000 at a
// time; a filtered page may come back short (the store bounds its work), so it reads on.
// ``reads`` lists the query string of each request (?limit=&after=&name=), oldest first.
async function readKeys(name, after, count, filter) {
  const keys = [];
  const reads = [];
  let next = after;
  for (let calls = 0; calls < MAX_CALLS; calls += 1) {
    const query = new URLSearchParams({ limit: String(Math.min(MAX_LIMIT, count - keys.length)) });
    if (next) query.set("after", next);
    if (filter) query.set("name", filter);
    const answer = await authorized("GET", "apis/" + path(name, "keys") + "?" + query);
    keys.push(...answer.keys);
    reads.push(query.toString());
    next = answer.next;
    if (next === null || keys.length >= count) break;
  }
  return { keys, next, reads };
}

// Forget the search and the pages shown (signing out: nothing of a session stays in the page,
// and the next one starts with every key, whoever signs in).
export function resetPages() {
  clearTimeout(timer);
  shownApi = null;
  wanted = PAGE_SIZE;
  Object.assign(state, { keysNext: null, keyFilter: "", keyReads: [] });
  const box = $("key-search");
  if (box) box.value = "";
  renderPages();
}

// The search box and the "Show more keys" button, added around the two sections of keys.
export function wirePages() {
  state.keysNext = null;
  state.keyFilter = "";
  state.keyReads = [];
  const internal = $("internal");
  const external = $("external");
  if (!internal || !external || $("key-search")) return;
  const box = el("input", {
    type: "search",
    id: "key-search",
    autocomplete: "off",
    spellcheck: "false",
    maxlength: "100",
    placeholder: "Part of a key's name",
    "aria-describedby": "key-search-hint",
    "data-read": "true", // searching changes nothing: on in a read-only session too
  });
  box.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => search(box.value), DEBOUNCE_MS);
  });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      clearTimeout(timer);
      search(box.value);
    }
  });
  const form = el("div", { class: "card key-search", role: "search" },
    el("label", { for: "key-search", text: "Search keys by name" }),
    box,
    el("p", { id: "key-search-hint", class: "hint",
      text: "Shows the keys of both kinds whose name contains this text, in any case." }));
  internal.before(form);
  // Reading more keys changes nothing: on in a read-only session too.
  const more = el("button", { type: "button", id: "more-keys", class: "more-keys", hidden: "",
    "data-read": "true", text: "Show more keys",
    onclick: (event) => showMore(event.currentTarget) });
  const status = el("p", { id: "keys-shown", class: "hint keys-shown", role: "status" });
  external.after(el("div", { class: "keys-paging" }, status, more));
}

async function search(text) {
  const filter = text.trim();
  if (filter === state.keyFilter) return;
  state.keyFilter = filter;
  wanted = PAGE_SIZE;
  await page.reload();
}

async function showMore(button) {
  const name = state.selected;
  const ticket = state.loads;
  const filter = state.keyFilter;
  const current = () => ticket === state.loads && name === state.selected &&
    filter === state.keyFilter;
  if (!name || state.keysNext === null) return;
  await withBusy(button, async () => {
    try {
      const more = await readKeys(name, state.keysNext, PAGE_SIZE, filter);
      // A reload or another API since the click: its answer is the one to keep.
      if (!current()) return;
      state.keys = state.keys.concat(more.keys);
      state.keysNext = more.next;
      state.keyReads = state.keyReads.concat(more.reads);
      wanted = state.keys.length;
      page.redraw();
      announce(shownText());
      // The new rows' usage lines: the totals of the pages just read, and only those.
      loadMoreTotals(name, more.reads, current);
    } catch (error) {
      if (error.code !== "unauthorized") page.error(explain(error));
    }
  });
}

// After the sections are drawn: the button if more keys follow, and what is shown.
export function renderPages() {
  const more = $("more-keys");
  const status = $("keys-shown");
  if (!more || !status) return;
  more.hidden = state.keysNext === null;
  status.textContent = shownText();
}

function shownText() {
  const shown = state.keys.length;
  const api = state.api;
  const total = api && api.keys ? api.keys.internal + api.keys.external : shown;
  const plural = (n) => n + (n === 1 ? " key" : " keys");
  if (state.keyFilter) {
    return plural(shown) + " whose name contains “" + state.keyFilter + "”"
      + (state.keysNext === null ? "." : " so far: Show more keys to look further.");
  }
  if (state.keysNext === null) return "";
  return "Showing " + shown + " of " + plural(total) + ", oldest first.";
}
