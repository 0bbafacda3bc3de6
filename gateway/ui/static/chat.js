// The chat page: conversations, the model picker, streaming replies (stop, regenerate, edit).
"use strict";

(function () {
  const { el, replace, $, api, announce } = window.VCG;
  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  // /v1/models lists only what can run here; each state says what a request for it will meet.
  const STATE_LABELS = {
    ready: "ready",
    loading: "loading",
    starting: "starting",
    waking: "waking up",
    failed: "failed",
    idle: "idle",
    draining: "switching",
    stopping: "stopping",
    restarting: "restarting",
    unloading: "unloading",
  };
  const ASLEEP_STATES = new Set(["sleeping", "asleep"]);
  const NOT_LOADED_STATES = new Set(["not_loaded", "available", "idle"]);
  const MODEL_WAIT_MS = 600000; // a cold load of a large model may take minutes

  const state = {
    me: null,
    conversations: [],
    cursor: null,
    query: "",
    current: null, // the open conversation (without messages), or null for a new chat
    messages: [],
    models: [],
    stream: null, // {controller, message} while a reply streams
    switching: false,
    modelTimer: null,
  };

  const isAdmin = () => Boolean(state.me && state.me.role === "admin");

  // -- sign in / out ------------------------------------------------------------------------------

  async function start() {
    if (!(await window.VCG.startPage({ enter, wire, stop: stopTimers }))) {
      $("#login-username").focus();
    }
  }

  async function enter(me) {
    state.me = me;
    $("#who").textContent = me.username || "";
    $("#admin-link").hidden = !isAdmin();
    window.VCG.showView("chat-view");
    await Promise.all([loadModels(), loadConversations()]);
    const fromHash = /^#c=(.+)$/.exec(location.hash);
    if (fromHash && UUID.test(fromHash[1])) await openConversation(fromHash[1]);
    // A message sent while the lists were still loading is kept: no reset under the user.
    else if (!state.current && !state.messages.length) newChat();
    state.modelTimer = setInterval(() => {
      if (!state.switching && document.visibilityState === "visible") loadModels().catch(() => {});
    }, 15000);
  }

  function stopTimers() {
    clearInterval(state.modelTimer);
    state.modelTimer = null;
  }

  // -- models ------------------------------------------------------------------------------------

  async function loadModels() {
    const select = $("#model-select");
    const previous = select.value;
    let list;
    try {
      list = await api("/v1/models");
    } catch (err) {
      announce("Models could not be listed: " + err.message, "error");
      return;
    }
    // One entry per profile: its served name (aliases name the same engine).
    const seen = new Set();
    state.models = (list.data || []).filter((m) => {
      const key = m.profile || m.id;
      if (seen.has(key)) return false;
      seen.add(key);
      return true;
    });
    const ready = state.models.find((m) => m.state === "ready");
    const options = [
      el("option", { value: "current" }, "Active model" + (ready ? " (" + ready.id + ")" : "")),
    ];
    // Any model may be picked: a request for one that sleeps wakes it, and one that is not
    // loaded loads it when the gateway switches on demand (otherwise the reply says so).
    for (const model of state.models) {
      const aliases = (model.aliases || []).filter((alias) => alias !== model.id);
      options.push(
        el("option", {
          value: model.id,
          "data-state": model.state,
          title: aliases.length ? "Also called " + aliases.join(", ") : null,
        }, model.id + " — " + modelLabel(model)),
      );
    }
    replace(select, options);
    const keep = [...select.options].find((o) => o.value === previous && !o.disabled);
    select.value = keep ? previous : ready ? ready.id : "current";
    updateSwitchButton();
  }

  /** "ready", "sleeping (wakes in ~3 s)", "not loaded (loads in ~40 s)", "not loaded (loads on first use)"… */
  function modelLabel(model) {
    if (ASLEEP_STATES.has(model.state)) {
      return "sleeping (" + (typeof model.wake_s === "number"
        ? "wakes in ~" + roundSeconds(model.wake_s) + " s"
        : "wakes in a few seconds") + ")";
    }
    if (NOT_LOADED_STATES.has(model.state)) {
      return "not loaded (" + (typeof model.load_s === "number"
        ? "loads in ~" + roundSeconds(model.load_s) + " s"
        : "loads on first use") + ")";
    }
    return STATE_LABELS[model.state] || String(model.state).replaceAll("_", " ");
  }

  function roundSeconds(value) {
    return Math.max(1, Math.round(value));
  }

  function selectedModel() {
    return state.models.find((m) => m.id === $("#model-select").value) || null;
  }

  /** What an admin's button does to the picked model: wake it, load it, or nothing. */
  function modelAction(model) {
    if (!isAdmin() || !model) return null;
    if (ASLEEP_STATES.has(model.state)) return { path: "wake", label: "Wake model", doing: "Waking" };
    if (NOT_LOADED_STATES.has(model.state) || model.state === "failed") {
      return { path: "load", label: "Load model", doing: "Loading" };
    }
    return null;
  }

  function updateSwitchButton() {
    const action = modelAction(selectedModel());
    const button = $("#switch-model");
    button.hidden = !action || state.switching;
    if (action) button.textContent = action.label;
  }

  /** An admin loads (or wakes) the picked model beside the others, then waits for it in
   *  /v1/models; a request would do the same on demand, this only saves the wait. */
  async function switchModel() {
    const model = selectedModel();
    const action = modelAction(model);
    if (!action) return;
    state.switching = true;
    updateSwitchButton();
    const bar = $("#switch-bar");
    const text = $("#switch-text");
    $("#switch-progress").hidden = false;
    bar.removeAttribute("value");
    text.textContent = action.doing + " " + model.id + "…";
    try {
      const job = await api(
        "/api/models/" + encodeURIComponent(model.profile) + "/" + action.path,
        { method: "POST" },
      );
      const outcome = await waitForModel(model.id, job);
      if (outcome === "ready") {
        bar.value = 1;
        announce(model.id + " is ready.");
      } else {
        announce(model.id + " is not ready: " + outcome, "error");
      }
    } catch (err) {
      announce(action.doing + " refused: " + err.message, "error");
    } finally {
      state.switching = false;
      $("#switch-progress").hidden = true;
      await loadModels();
    }
  }

  /** Follow the admin's job until it ends; "ready", or why the model is not. */
  async function waitForModel(id, job) {
    const jobId = job && (job.job_id || job.id);
    const deadline = Date.now() + MODEL_WAIT_MS;
    while (job && ["pending", "running"].includes(job.status) && Date.now() < deadline) {
      const last = job.events && job.events[job.events.length - 1];
      if (last) {
        if (typeof last.progress === "number") $("#switch-bar").value = last.progress;
        if (last.message) $("#switch-text").textContent = last.message;
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
      job = await api("/api/models/jobs/" + encodeURIComponent(jobId));
    }
    if (job && job.status !== "succeeded") {
      return job.status.replace("_", " ") + (job.error ? ": " + job.error : "");
    }
    // The job is done: the listing says whether the model serves now (an unfinished job too).
    const list = await api("/v1/models");
    const model = (list.data || []).find((m) => m.id === id);
    return model && model.state === "ready" ? "ready" : model ? modelLabel(model) : "not listed";
  }

  // -- conversation list -------------------------------------------------------------------------

  async function loadConversations(more) {
    const params = new URLSearchParams({ limit: "30", archived: "false" });
    if (state.query) params.set("q", state.query);
    if (more && state.cursor) params.set("cursor", state.cursor);
    try {
      const page = await api("/api/conversations?" + params.toString());
      state.conversations = more ? state.conversations.concat(page.data) : page.data;
      state.cursor = page.next_cursor || null;
    } catch (err) {
      announce("Conversations could not be loaded: " + err.message, "error");
    }
    renderConversations();
  }

  function renderConversations() {
    const list = $("#conversations");
    const items = state.conversations.map((conversation) => {
      const current = state.current && state.current.id === conversation.id;
      const title = conversation.title || "Untitled";
      return el(
        "li",
        { class: current ? "current" : null, "data-id": conversation.id },
        el(
          "button",
          {
            type: "button",
            class: "open",
            title: title,
            "aria-current": current ? "true" : null,
            on: { click: () => openConversation(conversation.id) },
          },
          title,
        ),
        el("button", {
          type: "button",
          class: "icon",
          "aria-label": "Rename " + title,
          text: "✎",
          on: { click: (event) => startRename(event.target.closest("li"), conversation) },
        }),
        el("button", {
          type: "button",
          class: "icon",
          "aria-label": "Delete " + title,
          text: "✕",
          on: { click: () => deleteConversation(conversation) },
        }),
      );
    });
    if (!items.length) {
      items.push(el("li", { class: "muted" }, state.query ? "No matches." : "No conversations yet."));
    }
    replace(list, items);
    $("#more-conversations").hidden = !state.cursor;
  }

  function startRename(item, conversation) {
    const input = el("input", {
      type: "text",
      value: conversation.title || "",
      "aria-label": "New title",
      maxlength: "200",
    });
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== conversation.title) {
        try {
          const updated = await api("/api/conversations/" + conversation.id, {
            method: "PATCH",
            body: { title },
          });
          Object.assign(conversation, updated);
          if (state.current && state.current.id === conversation.id) state.current.title = title;
        } catch (err) {
          announce("Rename failed: " + err.message, "error");
        }
      }
      renderConversations();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        finish(true);
      } else if (event.key === "Escape") {
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    replace(item, input);
    input.focus();
    input.select();
  }

  async function deleteConversation(conversation) {
    if (!window.confirm('Delete "' + (conversation.title || "Untitled") + '"?')) return;
    try {
      await api("/api/conversations/" + conversation.id, { method: "DELETE" });
    } catch (err) {
      announce("Delete failed: " + err.message, "error");
      return;
    }
    state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
    if (state.current && state.current.id === conversation.id) newChat();
    renderConversations();
    announce("Conversation deleted.");
  }

  // -- one conversation --------------------------------------------------------------------------

  function newChat() {
    if (state.stream) return;
    state.current = null;
    state.messages = [];
    history.replaceState(null, "", location.pathname);
    renderConversations();
    renderMessages();
    closeSidebar();
    $("#prompt").focus();
  }

  async function openConversation(id) {
    if (state.stream) return;
    try {
      let page = await api("/api/conversations/" + id + "?limit=100");
      const messages = page.messages.slice();
      for (let pages = 0; page.next_cursor && pages < 20; pages += 1) {
        page = await api(
          "/api/conversations/" + id + "?limit=100&cursor=" + encodeURIComponent(page.next_cursor),
        );
        messages.push(...page.messages);
      }
      const conversation = Object.assign({}, page);
      delete conversation.messages;
      delete conversation.next_cursor;
      state.current = conversation;
      state.messages = messages;
      history.replaceState(null, "", "#c=" + id);
      if (conversation.model && [...$("#model-select").options].some((o) => o.value === conversation.model && !o.disabled)) {
        $("#model-select").value = conversation.model;
        updateSwitchButton();
      }
    } catch (err) {
      announce("The conversation could not be opened: " + err.message, "error");
      if (err.status === 404) newChat();
      return;
    }
    renderConversations();
    renderMessages();
    closeSidebar();
  }

  // -- messages ----------------------------------------------------------------------------------

  function messageView(message, index) {
    const isLastAssistant = message.role === "assistant" &&
      index === lastIndex("assistant") && !state.stream;
    const isLastUser = message.role === "user" && index === lastIndex("user") && !state.stream;
    const content = el("div", { class: "content" });
    fillContent(content, message);
    const badge = message.status && message.status !== "complete" && message.status !== "streaming"
      ? el("span", { class: "badge " + message.status }, message.status)
      : null;
    const actions = [];
    if (message.role === "assistant" && message.content) {
      actions.push(window.VCG.copyButton(() => message.content, "Copy reply"));
    }
    if (isLastAssistant && state.current) {
      actions.push(el("button", {
        type: "button",
        text: "Regenerate",
        on: { click: () => send("", "regenerate") },
      }));
    }
    if (isLastUser && state.current) {
      actions.push(el("button", {
        type: "button",
        text: "Edit",
        "aria-label": "Edit your last message",
        on: { click: () => startEdit(message) },
      }));
    }
    return el(
      "article",
      {
        class: "message " + message.role,
        "data-role": message.role,
        "data-status": message.status || "complete",
        "aria-label": message.role === "user" ? "Your message" : "Reply",
      },
      el("div", { class: "meta" },
        el("span", { class: "role" }, message.role === "user" ? "You" : message.role === "assistant" ? "Assistant" : "System"),
        message.role === "assistant" && message.model ? el("span", null, message.model) : null,
        badge,
      ),
      content,
      message.error ? el("p", { class: "error-text", role: "alert" }, message.error) : null,
      actions.length ? el("div", { class: "actions" }, actions) : null,
    );
  }

  function fillContent(content, message) {
    if (message.role === "assistant") {
      replace(content, window.VCG.renderMarkdown(message.content));
      content.classList.toggle("cursor", message.status === "streaming");
    } else {
      // What the user typed is shown exactly as typed.
      const lines = String(message.content || "").split("\n");
      replace(content, el("p", null, lines.flatMap((line, i) => (i ? [el("br"), line] : [line]))));
    }
  }

  function lastIndex(role) {
    for (let i = state.messages.length - 1; i >= 0; i -= 1) {
      if (state.messages[i].role === role) return i;
    }
    return -1;
  }

  function renderMessages() {
    const box = $("#messages");
    const shown = state.messages.filter((m) => m.role !== "system");
    if (!shown.length) {
      replace(box, el("p", { class: "empty" }, "Start a conversation."));
      return;
    }
    replace(box, state.messages.map((m, i) => (m.role === "system" ? null : messageView(m, i))));
    box.scrollTop = box.scrollHeight;
  }

  // Streaming updates re-render only the reply being written, once per animation frame.
  let pendingFrame = 0;

  function scheduleStreamUpdate() {
    if (pendingFrame) return;
    pendingFrame = requestAnimationFrame(() => {
      pendingFrame = 0;
      const box = $("#messages");
      const article = box.lastElementChild;
      if (!state.stream || !article || !article.matches(".message.assistant")) return;
      const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      fillContent($(".content", article), state.stream.message);
      if (nearBottom) box.scrollTop = box.scrollHeight;
    });
  }

  function startEdit(message) {
    const prompt = $("#prompt");
    prompt.value = message.content;
    prompt.dataset.editing = "true";
    $("#send").textContent = "Save & resend";
    prompt.focus();
  }

  function stopEditing() {
    delete $("#prompt").dataset.editing;
    $("#send").textContent = "Send";
  }

  function setStreaming(on) {
    $("#send").hidden = on;
    $("#stop").hidden = !on;
    $("#new-chat").disabled = on;
    if (!on) $("#prompt").focus();
  }

  /** Send a message (action "send"), regenerate the last reply, or edit the last message. */
  async function send(text, action) {
    if (state.stream) return;
    const model = $("#model-select").value || "current";
    const body = { model, stream: true };
    if (state.current) body.conversation_id = state.current.id;
    if (action === "regenerate") {
      body.action = "regenerate";
      const last = lastIndex("assistant");
      if (last >= 0 && last === state.messages.length - 1) state.messages.splice(last, 1);
    } else if (action === "edit") {
      body.action = "edit";
      body.message = text;
      const user = lastIndex("user");
      if (user >= 0) state.messages.splice(user);
      state.messages.push({ role: "user", content: text, status: "complete" });
    } else {
      body.message = text;
      state.messages.push({ role: "user", content: text, status: "complete" });
    }
    const reply = { role: "assistant", content: "", status: "streaming", model, error: null };
    state.messages.push(reply);
    const controller = new AbortController();
    state.stream = { controller, message: reply };
    setStreaming(true);
    renderMessages();
    let finished = false;
    let conversationId = state.current ? state.current.id : null;
    try {
      const response = await api("/api/chat", {
        method: "POST",
        body,
        signal: controller.signal,
        raw: true,
      });
      conversationId = response.headers.get("X-Conversation-Id") || conversationId;
      if (conversationId && UUID.test(conversationId) && !state.current) {
        state.current = { id: conversationId, title: "" };
        history.replaceState(null, "", "#c=" + conversationId);
      }
      await window.VCG.readEvents(response, ({ data }) => {
        if (data === "[DONE]") {
          finished = true;
          return;
        }
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (_) {
          return;
        }
        if (chunk && chunk.error) {
          reply.status = "error";
          reply.error = String(chunk.error.message || "The model stopped with an error.");
          return;
        }
        const choice = chunk && chunk.choices && chunk.choices[0];
        const delta = choice && choice.delta && choice.delta.content;
        if (typeof delta === "string" && delta) {
          reply.content += delta;
          scheduleStreamUpdate();
        }
        if (chunk && chunk.model) reply.model = String(chunk.model);
      });
      if (reply.status === "streaming") {
        reply.status = finished ? "complete" : "incomplete";
        if (!finished) reply.error = "The reply ended early.";
      }
    } catch (err) {
      if (err && err.name === "AbortError") {
        reply.status = "incomplete";
        announce("Stopped.");
      } else {
        reply.status = "error";
        reply.error = (err && err.message) || "The request failed.";
      }
    } finally {
      state.stream = null;
      stopEditing();
      setStreaming(false);
      renderMessages();
    }
    if (conversationId) {
      // The list shows new conversations and new titles; a finished reply is reloaded from the
      // server so that what is shown is what was stored.
      await loadConversations();
      if (reply.status === "complete") await openConversation(conversationId);
      else renderConversations();
    }
  }

  // -- wiring ------------------------------------------------------------------------------------

  function closeSidebar() {
    $("#sidebar").classList.remove("open");
    $("#toggle-sidebar").setAttribute("aria-expanded", "false");
  }

  function wire() {
    const prompt = $("#prompt");
    $("#composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = prompt.value.trim();
      if (!text || state.stream) return;
      prompt.value = "";
      send(text, prompt.dataset.editing ? "edit" : "send");
    });
    prompt.addEventListener("keydown", (event) => {
      // Enter sends, Shift+Enter is a new line; never while an IME is composing (Korean input).
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        $("#composer").requestSubmit();
      } else if (event.key === "Escape" && prompt.dataset.editing) {
        prompt.value = "";
        stopEditing();
      }
    });
    $("#stop").addEventListener("click", () => {
      if (state.stream) state.stream.controller.abort();
    });
    $("#new-chat").addEventListener("click", newChat);
    $("#more-conversations").addEventListener("click", () => loadConversations(true));
    let searchTimer = 0;
    $("#search").addEventListener("input", (event) => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        state.query = event.target.value.trim();
        loadConversations();
      }, 250);
    });
    $("#model-select").addEventListener("change", updateSwitchButton);
    $("#switch-model").addEventListener("click", switchModel);
    $("#toggle-sidebar").addEventListener("click", () => {
      const open = $("#sidebar").classList.toggle("open");
      $("#toggle-sidebar").setAttribute("aria-expanded", String(open));
    });
    $("#logout").addEventListener("click", async () => {
      if (state.stream) state.stream.controller.abort();
      stopTimers();
      await window.VCG.logout();
      state.me = null;
      state.conversations = [];
      state.messages = [];
      state.current = null;
      history.replaceState(null, "", location.pathname);
      window.VCG.showView("login-view");
    });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
