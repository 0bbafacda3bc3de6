// The admin console: engine and switch progress (live events), the fleet (GPU map, engines and
// their load / unload / sleep / wake), GPUs, profiles, load balancer, API keys, users and usage.
"use strict";

(function () {
  const { el, svg, replace, $, api, announce, formatBytes, formatDate, formatNumber } = window.VCG;
  const TIERS = ["free", "standard", "premium"];
  const ROLES = ["user", "admin"];
  const FINAL_STATES = new Set(["ready", "failed", "idle"]);
  // States after which the whole engine status is read again (restarts, error, log lines).
  const REFRESH_STATES = new Set([...FINAL_STATES, "restarting"]);
  // The fleet is read every few seconds, and every second while an engine is on its way somewhere.
  const FLEET_POLL_MS = 4000;
  const FLEET_BUSY_POLL_MS = 1000;
  const SETTLED_ENGINE_STATES = new Set(["idle", "ready", "failed", "asleep"]);
  const ACTIVE_JOB = new Set(["pending", "running"]);
  // Which fleet action makes sense in which engine state (a button is disabled otherwise).
  const FLEET_ACTIONS = [
    { action: "load", label: "Load", states: ["idle", "failed"] },
    { action: "unload", label: "Unload", states: ["ready", "asleep", "restarting"] },
    { action: "sleep", label: "Sleep", states: ["ready"] },
    { action: "wake", label: "Wake", states: ["asleep"] },
  ];

  const state = {
    me: null,
    engine: null,
    job: null,
    timers: [],
    events: null, // AbortController of the events stream
    polling: null, // job id being polled
    fleetOn: false, // the fleet is followed (signed in as an admin, console shown)
    fleetTimer: 0, // the next read of /api/models/engines
    fleetRead: 0, // reads started: only the latest one's answer is drawn
    fleet: null, // the last /api/models/engines
    profiles: null, // the last /api/models/profiles (profiles no engine has run yet)
  };

  // -- sign in -----------------------------------------------------------------------------------

  async function start() {
    await window.VCG.startPage({ enter, wire, stop });
  }

  function enter(me) {
    state.me = me;
    if (me.role !== "admin") {
      // Nothing of the console is loaded: the admin API would refuse this account anyway.
      $("#forbidden-user").textContent = me.username || "this account";
      window.VCG.showView("forbidden-view");
      return;
    }
    $("#who").textContent = me.username || "";
    window.VCG.showView("dashboard-view");
    refreshAll();
    followEvents();
    state.fleetOn = true;
    scheduleFleet(FLEET_POLL_MS);
    state.timers.push(setInterval(() => visible() && loadGpus(), 5000));
    state.timers.push(setInterval(() => visible() && loadProfiles(), 30000));
    state.timers.push(setInterval(() => visible() && loadLb(), 5000));
    state.timers.push(setInterval(() => visible() && loadStatus(), 15000));
  }

  function visible() {
    return document.visibilityState === "visible";
  }

  function stop() {
    state.timers.forEach(clearInterval);
    state.timers = [];
    state.fleetOn = false;
    clearTimeout(state.fleetTimer);
    state.fleetTimer = 0;
    if (state.events) state.events.abort();
    state.events = null;
  }

  async function signOut() {
    stop();
    await window.VCG.logout();
    state.me = null;
    window.VCG.showView("login-view");
  }

  function refreshAll() {
    return Promise.all([
      loadStatus(),
      loadFleet(),
      loadGpus(),
      loadProfiles(),
      loadLb(),
      loadKeys(),
      loadUsers(),
      loadUsage(),
    ]);
  }

  function failed(what) {
    return (err) => announce(what + ": " + err.message, "error");
  }

  // -- small builders ----------------------------------------------------------------------------

  function figures(target, pairs) {
    replace(
      target,
      pairs.map(([label, value, cls]) =>
        el("div", null, el("dt", null, label), el("dd", { class: cls || null }, value)),
      ),
    );
  }

  function stateText(value) {
    return el("span", { class: "state state-" + value, "data-state": value }, value);
  }

  function select(options, value, label, onChange) {
    const node = el(
      "select",
      { "aria-label": label, on: { change: (event) => onChange(event.target.value, event.target) } },
      options.map((option) => el("option", { value: option, selected: option === value }, option)),
    );
    node.value = value;
    return node;
  }

  function bar(value, max) {
    const width = max > 0 ? Math.max(0, Math.min(100, (value / max) * 100)) : 0;
    return svg(
      "svg",
      { viewBox: "0 0 100 10", preserveAspectRatio: "none", "aria-hidden": "true" },
      svg("rect", { x: 0, y: 0, width: width.toFixed(2), height: 10 }),
    );
  }

  // -- engine, switch and events -----------------------------------------------------------------

  async function loadStatus() {
    try {
      const status = await api("/api/models/status");
      renderEngine(status.engine);
      if (status.job) {
        state.job = status.job;
        renderJob(status.job);
      }
    } catch (err) {
      failed("Engine status")(err);
    }
  }

  /** "1 restart; 2 crashes in the last 600 s (at most 3 restarts)", or "off". */
  function restartsText(engine) {
    if (!engine.restart_limit) return "off (ENGINE_RESTART_MAX=0)";
    const restarts = engine.restarts || 0;
    const crashes = engine.recent_crashes || 0;
    return (
      formatNumber(restarts) + (restarts === 1 ? " restart; " : " restarts; ") +
      formatNumber(crashes) + (crashes === 1 ? " crash" : " crashes") +
      " in the last " + formatNumber(engine.restart_window_s) + " s (at most " +
      formatNumber(engine.restart_limit) + " restarts)"
    );
  }

  function renderEngine(engine) {
    state.engine = engine;
    const pairs = [
      ["Profile", engine.profile_id || "none"],
      // Ready but asleep: it serves nothing until it is woken up.
      ["State", engine.asleep ? el("span", null, stateText(engine.state), " ", stateText("asleep")) : stateText(engine.state)],
      ["Serves", (engine.served_names || []).join(", ") || "—"],
      ["Since", formatDate(engine.since)],
      ["In flight", formatNumber(engine.in_flight)],
      ["Engine", engine.engine_url || "—"],
      ["Restarts", restartsText(engine)],
    ];
    if (engine.state === "restarting" && engine.restart_at) {
      pairs.push(["Next restart", formatDate(engine.restart_at)]);
    }
    pairs.push(
      // Idle with an error: why no engine runs (e.g. the default profile does not fit here).
      [
        engine.state === "idle" && engine.error ? "Not serving" : "Error",
        engine.error || (engine.asleep ? engine.reason : null) || "—",
        engine.error || engine.asleep ? "error" : null,
      ],
    );
    if (engine.failure) pairs.push(["Code", engine.failure]);
    figures($("#engine-figures"), pairs);
    // The engine's own last lines (admins only): why it crashed or did not start.
    const logs = engine.logs || [];
    $("#engine-logs-box").hidden = !logs.length;
    $("#engine-logs").textContent = logs.join("\n");
  }

  /** "Switch", or the fleet job's kind ("Load", "Unload", "Sleep", "Wake"). */
  function jobName(job) {
    const kind = job.kind || "switch";
    return kind.charAt(0).toUpperCase() + kind.slice(1);
  }

  function renderJob(job) {
    const name = jobName(job);
    $("#switch-panel").hidden = false;
    $("#switch-title").textContent = name === "Switch"
      ? "Switch to " + job.profile_id + (job.previous_profile_id ? " (from " + job.previous_profile_id + ")" : "")
      : name + " " + job.profile_id;
    const last = job.events[job.events.length - 1];
    const progress = $("#switch-progress");
    if (job.status === "succeeded") progress.value = 1;
    else if (last && typeof last.progress === "number") progress.value = last.progress;
    $("#switch-message").textContent =
      job.status === "pending" || job.status === "running"
        ? (last ? last.message : "Waiting…")
        : job.status === "succeeded"
          ? "Done: " + job.profile_id + doneText(job)
          : name + " " + job.status.replace("_", " ") + ": " + (job.error || "");
    $("#switch-panel").dataset.status = job.status;
    replace(
      $("#switch-events"),
      job.events.map((event) =>
        el("li", null, stateText(event.state), " ", event.message),
      ),
    );
    const hasLogs = job.logs && job.logs.length;
    $("#switch-logs-box").hidden = !hasLogs;
    $("#switch-logs").textContent = hasLogs ? job.logs.join("\n") : "";
  }

  function doneText(job) {
    const kind = job.kind || "switch";
    if (kind === "unload") return " is unloaded.";
    if (kind === "sleep") return " is asleep.";
    return " is ready.";
  }

  function onProgress(event) {
    // Events of a switch job go to its panel; the engine's own (a crash, a restart, sleep) show
    // in the engine's figures, read again below.
    if (event.job_id) {
      $("#switch-panel").hidden = false;
      const progress = $("#switch-progress");
      if (typeof event.progress === "number") progress.value = event.progress;
      $("#switch-message").textContent = event.message;
      $("#switch-events").append(el("li", null, stateText(event.state), " ", event.message));
    }
    // The engine panel is the default engine's: another engine's progress shows in the fleet.
    if (state.engine && (!event.profile_id || event.profile_id === state.engine.profile_id)) {
      renderEngine(Object.assign({}, state.engine, { state: event.state }));
    } else {
      scheduleFleet(0);
    }
    if (!event.job_id || REFRESH_STATES.has(event.state)) {
      loadStatus();
      if (FINAL_STATES.has(event.state)) {
        loadFleet();
        loadProfiles();
        loadLb();
        if (event.job_id) pollJob(event.job_id);
      }
    }
  }

  /** Read /api/models/events with the token in a header; reconnect after a pause. */
  async function followEvents() {
    let pause = 1000;
    while (state.me && state.me.role === "admin") {
      const controller = new AbortController();
      state.events = controller;
      try {
        const response = await api("/api/models/events", { raw: true, signal: controller.signal });
        pause = 1000;
        await window.VCG.readEvents(response, ({ event, data }) => {
          let body;
          try {
            body = JSON.parse(data);
          } catch (_) {
            return;
          }
          if (event === "status") renderEngine(body);
          else if (event === "progress") onProgress(body);
        });
      } catch (err) {
        if (controller.signal.aborted) return;
        if (err.status === 401 || err.status === 403) return;
      }
      if (controller.signal.aborted) return;
      await new Promise((resolve) => setTimeout(resolve, pause));
      pause = Math.min(pause * 2, 15000);
    }
  }

  async function switchTo(profileId) {
    try {
      const job = await api("/api/models/switch", { method: "POST", body: { profile_id: profileId } });
      state.job = job;
      replace($("#switch-events"));
      renderJob(job);
      announce("Switching to " + profileId + "…");
      pollJob(job.job_id || job.id);
    } catch (err) {
      announce("Switch refused: " + err.message, "error");
    }
  }

  /** Poll a job until it ends (the events stream shows progress; this gets the outcome and logs). */
  async function pollJob(jobId) {
    if (state.polling === jobId) return;
    state.polling = jobId;
    try {
      for (;;) {
        const job = await api("/api/models/switch/" + encodeURIComponent(jobId));
        if (job.status !== "pending" && job.status !== "running") {
          renderJob(job);
          announce(
            job.status === "succeeded" ? job.profile_id + doneText(job) : jobName(job) + " " + job.status.replace("_", " ") + ".",
            job.status === "succeeded" ? "info" : "error",
          );
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    } catch (err) {
      failed("Switch job")(err);
    } finally {
      state.polling = null;
      loadStatus();
      loadFleet();
      loadProfiles();
      loadLb();
    }
  }

  // -- fleet: GPU map and engines ------------------------------------------------------------------

  /** Read /api/models/engines again after `delay` ms (one pending read at a time). */
  function scheduleFleet(delay) {
    if (!state.fleetOn) return;
    clearTimeout(state.fleetTimer);
    state.fleetTimer = setTimeout(async () => {
      const busy = visible() ? await loadFleet() : false;
      scheduleFleet(busy ? FLEET_BUSY_POLL_MS : FLEET_POLL_MS);
    }, delay);
  }

  /** Render the fleet; resolves true while an engine moves or a job acts on one. */
  async function loadFleet() {
    const read = ++state.fleetRead;
    let fleet;
    try {
      fleet = await api("/api/models/engines");
    } catch (err) {
      failed("Fleet")(err);
      return false;
    }
    if (read !== state.fleetRead) return true; // a newer read is on its way: let it draw
    state.fleet = fleet;
    renderFleet();
    return fleet.engines.some((engine) => !SETTLED_ENGINE_STATES.has(engine.state) || jobActive(engine));
  }

  function renderFleet() {
    const fleet = state.fleet;
    if (!fleet) return;
    const engines = fleet.engines || [];
    const resident = engines.filter((engine) => !["idle", "failed"].includes(engine.state)).length;
    $("#fleet-summary").textContent =
      "Default profile: " + (fleet.default_profile || "none") + " · " +
      resident + " of at most " + fleet.max_engines + " engines resident.";
    renderGpuMap(fleet.gpus || []);
    renderEngineTable(engines.concat(notYetRun(engines)));
  }

  /** The fleet lists engines it has run; a profile that can run here but never did is a row
   *  too (idle), so that it can be loaded from the table. */
  function notYetRun(engines) {
    const known = new Set(engines.map((engine) => engine.profile_id));
    return (state.profiles || [])
      .filter((profile) => !known.has(profile.id) && (profile.verdict || {}).fit !== "does_not_fit")
      .map((profile) => ({
        profile_id: profile.id,
        served_model_name: profile.served_model_name,
        aliases: profile.aliases,
        state: "idle",
        never_run: true,
        gpu_ids: [],
        is_default: profile.is_default,
        job: null,
      }));
  }

  function jobActive(engine) {
    return Boolean(engine.job && ACTIVE_JOB.has(engine.job.status));
  }

  /** Always in GiB, as the map's labels promise (formatBytes switches to MiB below 1 GiB). */
  function gib(bytes) {
    return ((bytes || 0) / 1024 ** 3).toFixed(1) + " GiB";
  }

  /** What a part of a GPU's memory is: "ready" (an engine that runs), "asleep" (a sleeping
   *  engine's residual), "busy" (an engine on its way), "foreign" (not ours) or "free". */
  function segmentKind(engineState) {
    if (engineState === "ready") return "ready";
    if (engineState === "asleep" || engineState === "sleeping") return "asleep";
    return "busy";
  }

  function renderGpuMap(gpus) {
    if (!gpus.length) {
      replace($("#gpu-map"), el("p", { class: "muted" }, "No GPUs: engines here run without one."));
      return;
    }
    replace($("#gpu-map"), gpus.map(gpuRow));
  }

  function gpuRow(gpu) {
    const total = Math.max(gpu.total_bytes || 0, 1);
    const parts = (gpu.engines || []).map((engine) => ({
      kind: segmentKind(engine.state),
      bytes: engine.bytes || 0,
      label: engine.profile_id + " (" + engine.state + (segmentKind(engine.state) === "asleep" ? ", residual" : "") + ")",
      profile: engine.profile_id,
      state: engine.state,
    }));
    parts.push({ kind: "foreign", bytes: gpu.not_ours_bytes || 0, label: "not ours" });
    parts.push({ kind: "free", bytes: gpu.free_bytes || 0, label: "free" });
    const width = 1000;
    let x = 0;
    const rects = [];
    for (const part of parts) {
      const w = Math.max(0, Math.min(width - x, (part.bytes / total) * width));
      if (w <= 0) continue;
      rects.push(svg("rect", { class: "seg seg-" + part.kind, x: x.toFixed(1), y: 0, width: w.toFixed(1), height: 20 },
        svg("title", null, part.label + ": " + gib(part.bytes))));
      x += w;
    }
    const captionId = "gpu-map-" + gpu.index;
    return el(
      "figure",
      { class: "gpu-row", "data-gpu": gpu.index, "aria-labelledby": captionId },
      // The total only: the reading's "used" may predate our engines (a recorded snapshot),
      // the parts below say who holds what.
      el("figcaption", { id: captionId },
        "GPU " + gpu.index + (gpu.node ? " · node " + gpu.node.slice(0, 12) : "") + " · " + gpu.name + " · " + gib(gpu.total_bytes)),
      svg("svg", { class: "gpu-bar", viewBox: "0 0 " + width + " 20", preserveAspectRatio: "none", "aria-hidden": "true" },
        svg("rect", { class: "seg seg-rest", x: 0, y: 0, width, height: 20 }), rects),
      el("ul", { class: "gpu-legend" },
        parts.map((part) => el(
          "li",
          { "data-segment": part.kind, "data-profile": part.profile || null, "data-state": part.state || null },
          el("span", { class: "swatch seg-" + part.kind, "aria-hidden": "true" }),
          part.label + " " + gib(part.bytes),
        ))),
    );
  }

  function seconds(value) {
    return typeof value === "number" ? value.toFixed(1) + " s" : "—";
  }

  function renderEngineTable(engines) {
    replace(
      $("#engine-table tbody"),
      engines.length ? engines.map(engineRow) :
        el("tr", null, el("td", { colspan: 8, class: "muted" }, "No engine has run yet.")),
    );
  }

  function engineRow(engine) {
    const job = engine.job;
    const working = jobActive(engine);
    const held = engine.held_bytes_per_gpu;
    const problem = engine.error || engine.reason;
    return el(
      "tr",
      { "data-engine": engine.profile_id, "data-state": engine.state },
      el("td", null,
        el("strong", null, engine.profile_id),
        engine.is_default ? el("span", { class: "badge", title: "What the model \"current\" names" }, "default") : null,
        engine.pinned ? el("span", { class: "badge" }, "pinned") : null,
        el("br"),
        el("span", { class: "muted" }, [engine.served_model_name, ...(engine.aliases || [])]
          .filter((name) => name && name !== engine.profile_id).join(", "))),
      el("td", null,
        stateText(engine.state),
        engine.never_run ? el("span", { class: "muted" }, " · not loaded yet") : null,
        working ? el("span", { class: "muted" }, " · " + job.kind + " " + job.status) : null,
        problem ? el("br") : null,
        problem ? el("span", { class: engine.error ? "error" : "muted" }, problem) : null,
        engine.failure ? el("span", { class: "muted" }, " (" + engine.failure + ")") : null),
      el("td", { title: engine.node ? "Node: " + engine.node : null },
        engine.never_run ? "—" : (engine.gpu_ids || []).length ? engine.gpu_ids.join(", ") : "no GPU"),
      el("td", null, engine.claim_bytes_per_gpu ? gib(engine.claim_bytes_per_gpu) : "—",
        held && held !== engine.claim_bytes_per_gpu ? el("span", { class: "muted" }, " (holds " + gib(held) + ")") : null),
      el("td", null, [engine.in_flight, engine.queued, engine.slots].map(formatNumber).join(" / ")),
      el("td", null, formatDate(engine.last_used)),
      el("td", null, seconds(engine.last_load_s) + " / " + seconds(engine.last_wake_s)),
      el("td", { class: "actions" }, FLEET_ACTIONS.map((spec) => el("button", {
        type: "button",
        "data-action": spec.action,
        disabled: working || !spec.states.includes(engine.state) ||
          (spec.action === "sleep" && engine.profile_sleep_level === 0),
        title: spec.action === "sleep" && engine.profile_sleep_level === 0 ? "No sleep mode (sleep_level 0)" : null,
        "aria-label": spec.label + " " + engine.profile_id,
        text: spec.label,
        on: { click: (event) => fleetAction(engine.profile_id, spec, event.target) },
      }))),
    );
  }

  /** POST /api/models/{id}/{action}: 202 with the job; the table follows it until it ends. */
  async function fleetAction(profileId, spec, button) {
    button.disabled = true;
    try {
      const job = await api("/api/models/" + encodeURIComponent(profileId) + "/" + spec.action, { method: "POST" });
      announce(spec.label + " " + profileId + ": " + (job && job.status ? job.status : "accepted") + ".");
    } catch (err) {
      announce(spec.label + " refused: " + err.message, "error");
    }
    scheduleFleet(0);
  }

  // -- GPUs --------------------------------------------------------------------------------------

  async function loadGpus() {
    let inventory;
    try {
      inventory = await api("/api/gpus");
    } catch (err) {
      failed("GPUs")(err);
      return;
    }
    $("#gpu-source").textContent =
      inventory.count === 0
        ? "No GPUs" + (inventory.reason ? ": " + inventory.reason : ".")
        : inventory.count + " GPU(s), read from " + inventory.source +
          ((inventory.nodes || []).length ? " (" + inventory.nodes.map((n) => (n.hostname || n.address) + " " + n.node_id.slice(0, 12) + ": " + n.gpus + " GPU(s)").join("; ") + ")" : "") +
          (inventory.driver_version ? ", driver " + inventory.driver_version : "");
    replace(
      $("#gpu-cards"),
      inventory.gpus.map((gpu) => {
        const memoryId = "gpu-mem-" + gpu.index;
        const utilId = "gpu-util-" + gpu.index;
        return el(
          "article",
          { class: "card", "aria-label": "GPU " + gpu.index },
          el("h3", null, "GPU " + gpu.index + " · " + gpu.name),
          gpu.node ? el("p", { class: "muted" }, "Node " + gpu.node.slice(0, 12) + ", GPU " + gpu.node_index + " there") : null,
          el("p", { id: memoryId, class: "muted" },
            "Memory " + formatBytes(gpu.memory_used_bytes) + " of " + formatBytes(gpu.memory_total_bytes)),
          el("meter", {
            min: 0,
            max: gpu.memory_total_bytes,
            value: gpu.memory_used_bytes,
            high: gpu.memory_total_bytes * 0.9,
            "aria-labelledby": memoryId,
          }),
          el("p", { id: utilId, class: "muted" },
            "Utilization " + (gpu.utilization_percent === null ? "—" : gpu.utilization_percent + "%")),
          el("meter", { min: 0, max: 100, value: gpu.utilization_percent || 0, "aria-labelledby": utilId }),
          el("dl", { class: "figures" },
            el("div", null, el("dt", null, "Temperature"),
              el("dd", null, gpu.temperature_c === null ? "—" : gpu.temperature_c + " °C")),
            el("div", null, el("dt", null, "Power"),
              el("dd", null, gpu.power_draw_w === null ? "—" :
                Math.round(gpu.power_draw_w) + (gpu.power_limit_w ? " / " + Math.round(gpu.power_limit_w) : "") + " W")),
            el("div", null, el("dt", null, "Processes"), el("dd", null, String(gpu.processes.length))),
          ),
        );
      }),
    );
  }

  // -- profiles ----------------------------------------------------------------------------------

  async function loadProfiles() {
    let list;
    try {
      list = await api("/api/models/profiles");
    } catch (err) {
      failed("Profiles")(err);
      return;
    }
    state.profiles = list.profiles;
    renderFleet();
    const engine = state.engine;
    const busy = engine && !["ready", "idle", "failed"].includes(engine.state);
    replace(
      $("#profile-table tbody"),
      list.profiles.map((profile) => {
        const verdict = profile.verdict || {};
        const fits = verdict.fit !== "does_not_fit";
        const active = profile.is_active;
        const label = profile.display_name || profile.id;
        return el(
          "tr",
          { "data-profile": profile.id },
          el("td", null, el("strong", null, label), el("br"),
            el("span", { class: "muted" }, profile.id + (profile.is_default ? " · default" : ""))),
          el("td", null,
            el("span", { class: "fit-" + verdict.fit }, String(verdict.fit || "—").replaceAll("_", " ")),
            (verdict.reasons || []).length ? el("br") : null,
            (verdict.reasons || []).length ? el("span", { class: "muted" }, verdict.reasons.join("; ")) : null,
          ),
          el("td", null, verdict.uses_gpu === false ? "no GPU" :
            (verdict.gpu_ids || []).join(", ") + " (TP " + (verdict.tensor_parallel_size || 1) + ")"),
          el("td", null, verdict.uses_gpu === false ? "—" :
            formatBytes(verdict.per_gpu_required_bytes) + " of " + formatBytes(verdict.per_gpu_budget_bytes)),
          el("td", null, active && engine ? stateText(engine.state) : ""),
          el("td", null, el("button", {
            type: "button",
            disabled: !fits || (active && engine && engine.state === "ready") || busy,
            "aria-label": "Switch to " + label,
            text: "Switch",
            on: { click: () => switchTo(profile.id) },
          })),
        );
      }),
    );
  }

  // -- load balancer -----------------------------------------------------------------------------

  async function loadLb() {
    try {
      const lb = await api("/lb/status");
      figures($("#lb-figures"), [
        ["Enabled", lb.enabled ? "yes" : "no"],
        ["Requests now", formatNumber(lb.current_requests)],
        ["Local / cloud", lb.local_requests + " / " + lb.cloud_requests],
        ["Local slots", formatNumber(lb.max_queue_size)],
        ["Queued", formatNumber(lb.queue_depth)],
        ["Overflowed", formatNumber(lb.overflow_count)],
        ["Predicted wait", lb.predicted_wait_s.toFixed(1) + " s"],
        ["Local model", lb.local_model || "—"],
        ["Cloud model", lb.cloud_model || "—"],
        ["Engine", stateText(lb.engine_state)],
      ]);
    } catch (err) {
      failed("Load balancer")(err);
    }
  }

  // -- keys --------------------------------------------------------------------------------------

  async function loadKeys() {
    let list;
    try {
      list = await api("/admin/api/keys");
    } catch (err) {
      failed("Keys")(err);
      return;
    }
    replace(
      $("#key-table tbody"),
      list.data.map((key) => {
        const name = key.prefix + "…";
        const active = key.status === "active";
        const expires = el("input", {
          type: "date",
          value: key.expires_at ? key.expires_at.slice(0, 10) : "",
          "aria-label": "Expiry of key " + name,
          disabled: !active,
          on: {
            change: (event) => updateKey(key, {
              expires_at: event.target.value ? event.target.value + "T23:59:59Z" : null,
            }),
          },
        });
        const tier = select(TIERS, key.tier, "Tier of key " + name, (value) => updateKey(key, { tier: value }));
        tier.disabled = !active;
        return el(
          "tr",
          { "data-key": key.id },
          el("td", null, el("code", null, name)),
          el("td", null, key.username),
          el("td", null, key.description || ""),
          el("td", null, tier),
          el("td", null, expires),
          el("td", null, el("span", { class: "state state-" + (active ? "ready" : "failed") }, key.status)),
          el("td", null, formatDate(key.last_used_at)),
          el("td", null, el("button", {
            type: "button",
            class: "danger",
            disabled: !active,
            "aria-label": "Revoke key " + name,
            text: "Revoke",
            on: { click: () => revokeKey(key) },
          })),
        );
      }),
    );
  }

  async function updateKey(key, changes) {
    try {
      await api("/admin/api/keys/" + key.id, { method: "PUT", body: changes });
      announce("Key " + key.prefix + "… updated.");
    } catch (err) {
      announce("Update failed: " + err.message, "error");
    }
    loadKeys();
  }

  async function revokeKey(key) {
    if (!window.confirm("Revoke key " + key.prefix + "… of " + key.username + "? It stops working at once.")) return;
    try {
      await api("/admin/api/keys/" + key.id, { method: "DELETE" });
      announce("Key " + key.prefix + "… revoked.");
    } catch (err) {
      announce("Revoke failed: " + err.message, "error");
    }
    loadKeys();
  }

  async function createKey(event) {
    event.preventDefault();
    const form = event.target;
    const body = {
      user_id: $("#key-user").value.trim(),
      tier: $("#key-tier").value,
      description: $("#key-description").value.trim(),
    };
    if ($("#key-expires").value) body.expires_at = $("#key-expires").value + "T23:59:59Z";
    const models = $("#key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
    if (models.length) body.allowed_models = models;
    try {
      const created = await api("/admin/api/keys", { method: "POST", body });
      $("#new-key-value").value = created.key;
      $("#new-key").hidden = false;
      $("#new-key-value").focus();
      $("#new-key-value").select();
      form.reset();
      announce("Key created for " + created.username + ".");
    } catch (err) {
      announce("Key not created: " + err.message, "error");
    }
    loadKeys();
  }

  // -- users -------------------------------------------------------------------------------------

  async function loadUsers() {
    let list;
    try {
      list = await api("/admin/api/users?limit=500");
    } catch (err) {
      failed("Users")(err);
      return;
    }
    replace(
      $("#user-table tbody"),
      list.data.map((user) => {
        const self = state.me && user.id === state.me.id;
        const role = select(ROLES, user.role, "Role of " + user.username, (value) => updateUser(user, { role: value }));
        role.disabled = self; // do not lock yourself out from here
        const active = el("input", {
          type: "checkbox",
          checked: user.is_active,
          disabled: self,
          "aria-label": "Account of " + user.username + " is active",
          on: { change: (event) => updateUser(user, { is_active: event.target.checked }) },
        });
        return el(
          "tr",
          { "data-user": user.id },
          el("td", null, user.username, user.has_password ? "" : el("span", { class: "muted" }, " (service)")),
          el("td", null, role),
          el("td", null, select(TIERS, user.tier, "Tier of " + user.username, (value) => updateUser(user, { tier: value }))),
          el("td", null, active),
          el("td", null, formatDate(user.last_login_at)),
        );
      }),
    );
  }

  async function updateUser(user, changes) {
    try {
      await api("/admin/api/users/" + user.id, { method: "PATCH", body: changes });
      announce(user.username + " updated.");
    } catch (err) {
      announce("Update failed: " + err.message, "error");
    }
    loadUsers();
  }

  async function createUser(event) {
    event.preventDefault();
    const form = event.target;
    const body = {
      username: $("#user-name").value.trim(),
      role: $("#user-role").value,
      tier: $("#user-tier").value,
    };
    if ($("#user-password").value) body.password = $("#user-password").value;
    try {
      const user = await api("/admin/api/users", { method: "POST", body });
      form.reset();
      announce("User " + user.username + " created.");
    } catch (err) {
      announce("User not created: " + err.message, "error");
    }
    loadUsers();
  }

  // -- usage -------------------------------------------------------------------------------------

  async function loadUsage() {
    let report;
    try {
      report = await api("/admin/api/usage?days=" + encodeURIComponent($("#usage-days").value));
    } catch (err) {
      failed("Usage")(err);
      return;
    }
    const t = report.totals;
    figures($("#usage-totals"), [
      ["Requests", formatNumber(t.requests)],
      ["Prompt tokens", formatNumber(t.prompt_tokens)],
      ["Completion tokens", formatNumber(t.completion_tokens)],
      ["Errors", formatNumber(t.errors)],
      ["Cloud", formatNumber(t.cloud_requests)],
      ["Avg latency", Math.round(t.avg_duration_ms) + " ms"],
    ]);
    replace($("#usage-days-chart"), dayChart(report.by_day));
    usageTable($("#usage-models"), "Model", report.by_model, (row) => row.model || "(none)");
    usageTable($("#usage-keys"), "Key", report.by_key, (row) => (row.prefix ? row.prefix + "…" : "(login or none)"));
    usageTable($("#usage-users"), "User", report.by_user, (row) => row.username || "(anonymous)");
  }

  function dayChart(days) {
    const width = 600;
    const height = 160;
    const bottom = 20;
    const max = Math.max(1, ...days.map((d) => d.requests));
    const step = width / Math.max(1, days.length);
    const bars = days.map((day, i) => {
      const h = ((height - bottom - 10) * day.requests) / max;
      return svg(
        "g",
        null,
        svg("rect", {
          class: "bar",
          x: (i * step + step * 0.15).toFixed(1),
          y: (height - bottom - h).toFixed(1),
          width: (step * 0.7).toFixed(1),
          height: h.toFixed(1),
        }, svg("title", null, day.date + ": " + day.requests + " requests, " + day.total_tokens + " tokens")),
        days.length <= 31 && (days.length <= 10 || i % Math.ceil(days.length / 10) === 0)
          ? svg("text", { x: (i * step + step / 2).toFixed(1), y: height - 5, "text-anchor": "middle" }, day.date.slice(5))
          : null,
      );
    });
    return svg(
      "svg",
      { class: "chart", viewBox: "0 0 " + width + " " + height, role: "img", "aria-labelledby": "usage-day-title" },
      svg("text", { x: 2, y: 10 }, "max " + max),
      bars,
    );
  }

  function usageTable(table, label, rows, name) {
    const max = Math.max(1, ...rows.map((r) => r.total_tokens));
    replace(
      table,
      el("thead", null, el("tr", null,
        ["" + label, "Requests", "Tokens", "", "Errors", "Avg latency"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", null, rows.length ? rows.map((row) => el(
        "tr",
        null,
        el("td", null, name(row)),
        el("td", null, formatNumber(row.requests)),
        el("td", null, formatNumber(row.total_tokens)),
        el("td", { class: "bar-cell" }, bar(row.total_tokens, max)),
        el("td", null, formatNumber(row.errors)),
        el("td", null, Math.round(row.avg_duration_ms) + " ms"),
      )) : el("tr", null, el("td", { colspan: 6, class: "muted" }, "No requests in this period."))),
    );
  }

  // -- wiring ------------------------------------------------------------------------------------

  function wire() {
    $("#logout").addEventListener("click", signOut);
    $("#forbidden-logout").addEventListener("click", signOut);
    $("#key-form").addEventListener("submit", createKey);
    $("#user-form").addEventListener("submit", createUser);
    $("#usage-days").addEventListener("change", loadUsage);
    $("#new-key-copy").addEventListener("click", async () => {
      try {
        await window.VCG.copyText($("#new-key-value").value);
        $("#new-key-copy").textContent = "Copied";
      } catch (_) {
        $("#new-key-copy").textContent = "Select and copy";
      }
    });
    $("#new-key-done").addEventListener("click", () => {
      $("#new-key-value").value = "";
      $("#new-key").hidden = true;
      $("#new-key-copy").textContent = "Copy";
    });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
