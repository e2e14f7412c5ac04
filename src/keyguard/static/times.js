// keyguard console: times as the page shows them, and as the management API takes them.
//
// The API speaks RFC 3339 in UTC; the operator reads and types local times. Relative
// phrases ("in 3 days") are English, like the rest of the page; dates follow the browser's
// locale.

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

// The grace periods offered when a secret or a key is replaced (SPEC §8: at most 30 days).
export const GRACES = [
  { seconds: 0, label: "None: at once" },
  { seconds: 3600, label: "1 hour" },
  { seconds: 86400, label: "1 day" },
  { seconds: 7 * 86400, label: "7 days" },
  { seconds: 30 * 86400, label: "30 days" },
];

const relativeFormat = new Intl.RelativeTimeFormat("en", { numeric: "auto" });

function parsed(value) {
  if (typeof value !== "string" || !value) return null; // new Date(null) would be 1970
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? null : date;
}

export function isPast(value, now = Date.now()) {
  const date = parsed(value);
  return date !== null && date.getTime() <= now;
}

export function formatDate(value) {
  const date = parsed(value);
  if (!date) return value;
  return date.toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
}

export function formatDateTime(value) {
  const date = parsed(value);
  if (!date) return value;
  return date.toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  });
}

// "in 3 days", "2 hours ago", "in 5 minutes": the largest unit that fits, rounded.
function relative(value, now = Date.now()) {
  const date = parsed(value);
  if (!date) return value;
  const diff = date.getTime() - now;
  const size = Math.abs(diff);
  if (size < MINUTE) return diff >= 0 ? "in less than a minute" : "just now";
  if (size < HOUR) return relativeFormat.format(Math.round(diff / MINUTE), "minute");
  if (size < DAY) return relativeFormat.format(Math.round(diff / HOUR), "hour");
  return relativeFormat.format(Math.round(diff / DAY), "day");
}

// "in 3 days" or "2 hours ago" when near (up to two months), else "on May 6, 2031".
export function when(value, now = Date.now()) {
  const date = parsed(value);
  if (!date) return value;
  return Math.abs(date.getTime() - now) <= 60 * DAY ? relative(value, now)
    : "on " + formatDate(value);
}

// RFC 3339 in UTC, to the second, as the API stores it.
function rfc3339(date) {
  return date.toISOString().replace(/\.\d{3}Z$/, "Z");
}

export function later(seconds, now = Date.now()) {
  return rfc3339(new Date(now + seconds * SECOND));
}

// A stored time as a datetime-local input's value: the operator's local time, to the minute.
export function toLocalInput(value) {
  const date = parsed(value);
  if (!date) return "";
  const two = (number) => String(number).padStart(2, "0");
  return date.getFullYear() + "-" + two(date.getMonth() + 1) + "-" + two(date.getDate()) +
    "T" + two(date.getHours()) + ":" + two(date.getMinutes());
}

// A datetime-local input's value (local time, no zone) as RFC 3339 UTC, or null.
export function fromLocalInput(text) {
  if (!/^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?$/.test(text)) return null;
  // A date-time without a zone is local time (ECMAScript's Date parsing rule).
  const date = parsed(text);
  return date ? rfc3339(date) : null;
}
