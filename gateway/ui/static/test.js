// The request tester (seed 000's /test): send any request to this gateway, show the raw answer.
//
// Only this gateway's own paths are sent (a path must start with one "/"), so a token typed or
// signed in here never goes to another host. Everything shown is text (textContent only).
"use strict";

(function () {
  const { $ } = window.VCG;
  const EXAMPLE = {
    model: "current",
    messages: [{ role: "user", content: "Hello!" }],
    max_tokens: 32,
  };
  const WITH_BODY = new Set(["POST", "PUT", "PATCH"]);

  /** A path of this gateway: "/..." but not "//host" or "/\host" (both leave the origin). */
  function ownPath(path) {
    return /^\/(?![\/\\])/.test(path) && !/[\s\\]/.test(path);
  }

  function authorization() {
    const typed = $("#request-auth").value.trim();
    if (typed) return /^bearer\s/i.test(typed) ? typed : "Bearer " + typed;
    const token = window.VCG.accessToken();
    return token ? "Bearer " + token : null;
  }

  async function send(event) {
    event.preventDefault();
    const error = $("#request-error");
    error.textContent = "";
    const method = $("#request-method").value;
    const path = $("#request-path").value.trim();
    if (!ownPath(path)) {
      error.textContent = "Only paths of this gateway can be sent: start with a single /.";
      return;
    }
    const headers = {};
    const auth = authorization();
    if (auth) headers.Authorization = auth;
    let body;
    if (WITH_BODY.has(method)) {
      body = $("#request-body").value;
      if (body.trim()) headers["Content-Type"] = "application/json";
    }
    const button = $("button[type=submit]", $("#request-form"));
    button.disabled = true;
    $("#response-status").textContent = "Sending…";
    $("#response-headers").textContent = "";
    $("#response-body").textContent = "";
    const started = performance.now();
    try {
      const response = await fetch(path, {
        method,
        headers,
        body,
        credentials: "omit",
        cache: "no-store",
        redirect: "manual",
      });
      const lines = [];
      response.headers.forEach((value, name) => lines.push(name + ": " + value));
      $("#response-headers").textContent = lines.sort().join("\n");
      const status = response.type === "opaqueredirect" ? "redirect" : response.status;
      $("#response-status").textContent = status + " " + response.statusText;
      await showBody(response);
      const ms = Math.round(performance.now() - started);
      $("#response-status").textContent = status + " " + response.statusText + " · " + ms + " ms";
    } catch (err) {
      $("#response-status").textContent = "";
      error.textContent = "The request failed: " + (err.message || err);
    } finally {
      button.disabled = false;
    }
  }

  /** The body as it arrives (a stream shows its events as they come), JSON indented at the end. */
  async function showBody(response) {
    const out = $("#response-body");
    if (!response.body) return;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      out.textContent = text;
    }
    text += decoder.decode();
    const type = response.headers.get("content-type") || "";
    if (type.includes("json")) {
      try {
        text = JSON.stringify(JSON.parse(text), null, 2);
      } catch (_) {
        /* not JSON after all: shown as it came */
      }
    }
    out.textContent = text;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#request-body").value = JSON.stringify(EXAMPLE, null, 2);
    $("#request-form").addEventListener("submit", send);
  });
})();
