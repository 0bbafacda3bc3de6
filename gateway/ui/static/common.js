// Shared by the chat and the admin console: DOM building, sign-in, the API client, an SSE reader.
//
// Safety rules for every script of these pages:
// - text from the server (model output, titles, names, errors) only ever reaches the page through
//   textContent / createTextNode / attribute values, never as HTML (the page's Trusted Types policy
//   turns any HTML-parsing sink into an error anyway);
// - tokens live in memory and sessionStorage and travel only in the Authorization header, never
//   in a URL (so the SSE endpoints are read with fetch(), not EventSource).
"use strict";

(function () {
  const VCG = (window.VCG = window.VCG || {});
  const TOKENS_KEY = "vcg.tokens";

  // -- DOM ---------------------------------------------------------------------------------------

  /** Build an element: el("button", {class: "x", "aria-label": "Copy", on: {click: f}}, "text", node). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    applyAttrs(node, attrs);
    append(node, children);
    return node;
  }

  /** The same for SVG elements (charts). */
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    applyAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function applyAttrs(node, attrs) {
    if (!attrs) return;
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "on") {
        for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
      } else if (name === "text") {
        node.textContent = String(value);
      } else if (/^on/i.test(name) || name === "style" || name === "srcdoc") {
        // Never: event-handler attributes and inline styles are exactly what CSP forbids.
        throw new Error("refused attribute " + name);
      } else {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  /** Replace a node's children. */
  function replace(node, ...children) {
    node.replaceChildren();
    append(node, children);
    return node;
  }

  function $(selector, root) {
    return (root || document).querySelector(selector);
  }

  /** Announce a short message to screen readers (and show it in the status line). */
  function announce(text, kind) {
    const line = $("#status-line");
    if (!line) return;
    line.textContent = text || "";
    line.dataset.kind = kind || "info";
  }

  // -- tokens ------------------------------------------------------------------------------------

  let tokens = null;
  try {
    tokens = JSON.parse(sessionStorage.getItem(TOKENS_KEY) || "null");
  } catch (_) {
    tokens = null;
  }

  function saveTokens(next) {
    tokens = next;
    if (next) sessionStorage.setItem(TOKENS_KEY, JSON.stringify(next));
    else sessionStorage.removeItem(TOKENS_KEY);
  }

  function signedIn() {
    return Boolean(tokens && tokens.access_token);
  }

  // -- API ---------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code || null;
    }
  }

  async function errorFrom(response) {
    let message = response.status + " " + (response.statusText || "error");
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        message = body.error.message;
        code = body.error.code || null;
      }
    } catch (_) {
      /* not JSON: keep the status line */
    }
    return new ApiError(response.status, message, code);
  }

  // One refresh at a time: a refresh token works once, and reusing one ends the session.
  let refreshing = null;

  function refresh() {
    if (!tokens || !tokens.refresh_token) return Promise.resolve(false);
    if (!refreshing) {
      const sent = tokens.refresh_token;
      refreshing = fetch("/api/auth/refresh", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ refresh_token: sent }),
        credentials: "omit",
      })
        .then(async (response) => {
          if (!response.ok) return false;
          saveTokens(await response.json());
          return true;
        })
        .catch(() => false)
        .finally(() => {
          refreshing = null;
        });
    }
    return refreshing;
  }

  /**
   * Call the API with the signed-in user's token. `raw: true` returns the Response (streams);
   * otherwise the parsed JSON (null for 204). Errors throw ApiError with the gateway's message.
   */
  async function api(path, options) {
    const opts = options || {};
    const send = () => {
      const headers = Object.assign({}, opts.headers || {});
      if (tokens && tokens.access_token) headers.Authorization = "Bearer " + tokens.access_token;
      let body = opts.body;
      if (body !== undefined && typeof body !== "string") {
        headers["Content-Type"] = "application/json";
        body = JSON.stringify(body);
      }
      return fetch(path, {
        method: opts.method || "GET",
        headers,
        body,
        signal: opts.signal,
        credentials: "omit",
        cache: "no-store",
      });
    };
    let response = await send();
    if (response.status === 401 && (await refresh())) response = await send();
    if (response.status === 401) {
      saveTokens(null);
      if (VCG.onSignedOut) VCG.onSignedOut();
    }
    if (!response.ok) throw await errorFrom(response);
    if (opts.raw) return response;
    if (response.status === 204) return null;
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }

  async function login(username, password) {
    const response = await fetch("/api/auth/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username, password }),
      credentials: "omit",
    });
    if (!response.ok) throw await errorFrom(response);
    saveTokens(await response.json());
    return me();
  }

  async function logout() {
    const current = tokens;
    saveTokens(null);
    if (!current) return;
    try {
      await fetch("/api/auth/logout", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Authorization: "Bearer " + current.access_token,
        },
        body: JSON.stringify({ refresh_token: current.refresh_token }),
        credentials: "omit",
      });
    } catch (_) {
      /* signed out locally either way */
    }
  }

  function me() {
    return api("/api/auth/me");
  }

  // -- Server-sent events over fetch() -----------------------------------------------------------

  /**
   * Read a text/event-stream body; call onEvent({event, data}) per event. Returns when the stream
   * ends; rejects with AbortError when the signal aborts. Data is handed over as text: callers
   * parse it as JSON and only ever display it as text.
   */
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    let event = "";
    const dispatch = () => {
      if (data.length) onEvent({ event: event || "message", data: data.join("\n") });
      data = [];
      event = "";
    };
    const line = (text) => {
      if (text === "") return dispatch();
      if (text.startsWith(":")) return undefined; // a comment (keep-alive)
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") event = value;
      return undefined;
    };
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      for (;;) {
        const match = /\r\n|\r|\n/.exec(buffer);
        if (!match) break;
        // A lone CR at the end may be the first half of CRLF: wait for the next chunk.
        if (match[0] === "\r" && match.index === buffer.length - 1) break;
        line(buffer.slice(0, match.index));
        buffer = buffer.slice(match.index + match[0].length);
      }
    }
    buffer += decoder.decode();
    if (buffer) line(buffer.replace(/\r$/, ""));
    dispatch();
  }

  // -- formatting --------------------------------------------------------------------------------

  function formatBytes(bytes) {
    if (bytes === null || bytes === undefined) return "—";
    const gib = bytes / 1024 ** 3;
    if (gib >= 1) return gib.toFixed(1) + " GiB";
    return (bytes / 1024 ** 2).toFixed(0) + " MiB";
  }

  function formatDate(value) {
    if (!value) return "—";
    const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    if (Number.isNaN(date.getTime())) return "—";
    return date.toLocaleString();
  }

  function formatNumber(value) {
    if (value === null || value === undefined) return "—";
    return Number(value).toLocaleString();
  }

  // -- the sign-in form shared by both pages -----------------------------------------------------

  /** Wire #login-form; `onSignedIn(me)` runs after a successful sign-in. */
  function setupLogin(onSignedIn) {
    const form = $("#login-form");
    const error = $("#login-error");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.textContent = "";
      const button = $("button[type=submit]", form);
      button.disabled = true;
      try {
        const user = await login($("#login-username").value.trim(), $("#login-password").value);
        $("#login-password").value = "";
        onSignedIn(user);
      } catch (err) {
        error.textContent = err.message || "Sign-in failed.";
      } finally {
        button.disabled = false;
      }
    });
  }

  /**
   * The start of both pages: on sign-out run `stop()` and show the login view; wire the login
   * form to `enter(me)` and the page's controls (`wire()`); enter at once with a session that
   * is still valid. Resolves true when signed in, false when the login view is shown.
   */
  async function startPage({ enter, wire, stop }) {
    VCG.onSignedOut = () => {
      stop();
      showView("login-view");
    };
    setupLogin(enter);
    wire();
    if (signedIn()) {
      try {
        enter(await me());
        return true;
      } catch (_) {
        /* expired: sign in again */
      }
    }
    showView("login-view");
    return false;
  }

  /** Show exactly one of the page's top-level views. */
  function showView(id) {
    for (const view of document.querySelectorAll("[data-view]")) {
      view.hidden = view.id !== id;
    }
  }

  /** The signed-in session's access token, or null (for the request tester). */
  function accessToken() {
    return tokens && tokens.access_token ? tokens.access_token : null;
  }

  Object.assign(VCG, {
    accessToken,
    el,
    svg,
    replace,
    $,
    announce,
    api,
    ApiError,
    login,
    logout,
    me,
    signedIn,
    readEvents,
    formatBytes,
    formatDate,
    formatNumber,
    setupLogin,
    showView,
    startPage,
  });
})();
