// Carlos pages: tabs, copy buttons, the request form's counter and the design's live feed.
// Model text arrives as plain text (textContent only); rendered HTML (a finished agent's output,
// the design's status line, timeline rows) comes from the server, escaped and sanitised there.
(() => {
  "use strict";
  document.documentElement.classList.add("js");

  // --- request form: a live character count -------------------------------------------------
  const requestText = document.querySelector("textarea[data-max-chars]");
  const counter = document.getElementById("char-count");
  if (requestText && counter) {
    const max = Number(requestText.dataset.maxChars);
    const update = () => {
      const used = requestText.value.replace(/\r\n/g, "\n").length;
      counter.textContent = `${used.toLocaleString()} / ${max.toLocaleString()}.`;
    };
    requestText.addEventListener("input", update);
    update();
  }

  // The request may first wait for the analyst's questions: show that the click was taken.
  const designForm = document.getElementById("design-form");
  if (designForm) {
    designForm.addEventListener("submit", () => {
      const button = designForm.querySelector("button[type=submit]");
      button.disabled = true;
      button.textContent = document.getElementById("id_ask_questions")?.checked
        ? "Preparing questions…" : "Starting…";
    });
  }

  // --- copy buttons (also inside fragments added later) --------------------------------------
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (!source) return;
    const text = source.textContent;
    let copied = false;
    try {
      await navigator.clipboard.writeText(text);
      copied = true;
    } catch {
      const area = document.createElement("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      copied = document.execCommand("copy");
      area.remove();
    }
    const label = button.textContent;
    button.textContent = copied ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = label; }, 1500);
  });

  // --- tabs ---------------------------------------------------------------------------------
  // On a design's page the selected tab follows the agent at work (`followAgent`) until the
  // user picks a tab: a click, the arrow keys, or a #tab in the address when the page loads.
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  let following = true;
  const selectTab = (tab, remember) => {
    for (const other of tabs) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      const panel = document.getElementById(other.getAttribute("aria-controls"));
      if (panel) panel.hidden = !selected;
    }
    if (remember) history.replaceState(null, "", `#${tab.id.replace(/^tab-/, "")}`);
  };
  const followAgent = (agent) => {
    const tab = document.getElementById(`tab-${agent}`);
    if (following && tab && tabs.includes(tab)) selectTab(tab, false);
  };
  if (tabs.length) {
    tabs.forEach((tab, index) => {
      tab.addEventListener("click", () => {
        following = false;
        selectTab(tab, true);
      });
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (!step) return;
        following = false;
        const next = tabs[(index + step + tabs.length) % tabs.length];
        next.focus();
        selectTab(next, true);
      });
    });
    const tabFromHash = () => {
      const wanted = document.getElementById(`tab-${location.hash.slice(1)}`);
      return wanted && tabs.includes(wanted) ? wanted : null;
    };
    const asked = tabFromHash();
    if (asked) following = false;
    selectTab(asked || tabs[0], false);
    window.addEventListener("hashchange", () => {
      const wanted = tabFromHash();
      if (!wanted) return;
      following = false;
      selectTab(wanted, false);
    });
  }

  // --- code blocks and tables scroll sideways (on phones): a keyboard must reach them -------
  const focusableBlocks = (root) => {
    for (const block of root.querySelectorAll(".panel pre, .panel :not(.table-scroll) > table")) {
      if (!block.hasAttribute("tabindex")) block.tabIndex = 0;
    }
  };
  focusableBlocks(document);

  // --- mermaid diagrams (drawn in the browser from server-sanitised source) ---------------
  let mermaidReady = false;
  let diagramCount = 0;
  const drawDiagrams = async (root) => {
    if (!window.mermaid) return;
    if (!mermaidReady) {
      window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "neutral" });
      mermaidReady = true;
    }
    for (const pre of root.querySelectorAll("pre.mermaid-source:not([data-diagram])")) {
      pre.dataset.diagram = "pending";
      const source = pre.textContent;
      const id = `diagram-${++diagramCount}`;
      try {
        if (!(await window.mermaid.parse(source, { suppressErrors: true }))) {
          pre.dataset.diagram = "invalid"; // the code block stays as the fallback
          continue;
        }
        const { svg } = await window.mermaid.render(id, source);
        const figure = document.createElement("div");
        figure.className = "diagram";
        figure.innerHTML = svg; // mermaid's strict mode sanitises its own SVG output
        // The drawing's text alternative is the caption the server wrote from its labels.
        const caption = pre.closest("figure")?.querySelector("figcaption");
        figure.setAttribute("role", "img");
        figure.setAttribute("aria-label", caption ? caption.textContent : "Diagram");
        const details = document.createElement("details");
        details.className = "source";
        const summary = document.createElement("summary");
        summary.textContent = "Diagram source";
        pre.replaceWith(figure);
        details.append(summary, pre);
        figure.after(details);
        pre.dataset.diagram = "drawn";
      } catch (error) {
        pre.dataset.diagram = "invalid";
        document.getElementById(`d${id}`)?.remove();
        console.warn("mermaid could not draw a diagram", error);
      }
    }
  };

  const dataNode = document.getElementById("design-data");
  if (!dataNode) return;
  const page = JSON.parse(dataNode.textContent);
  window.addEventListener("load", () => drawDiagrams(document));

  // --- live design feed ----------------------------------------------------------------------
  // The server sends the design's status line, its failure text, its progress bar, its
  // timeline and each timeline row rendered (agents/events.py, the page's own templates,
  // escaped there): they are swapped in whole, so this script knows no status labels and no
  // table columns. What a screen reader is told comes as a sentence (`announcement`).
  const connection = document.getElementById("connection");
  const timeline = document.querySelector("#timeline tbody");
  const progressBox = document.getElementById("design-progress-box");
  const timelineChart = document.getElementById("timeline-chart");
  const announcer = document.getElementById("announcer");
  let terminal = page.terminal;

  const fragment = (html) => {
    const template = document.createElement("template");
    template.innerHTML = html; // rendered and escaped by the server
    return template.content;
  };

  // Announcements that arrive together (two agents starting at once) are said together.
  let toAnnounce = [];
  let announceTimer = null;
  const announce = (text) => {
    if (!announcer || !text) return;
    toAnnounce.push(text);
    clearTimeout(announceTimer);
    announceTimer = setTimeout(() => {
      announcer.textContent = toAnnounce.join(". ");
      toAnnounce = [];
    }, 250);
  };

  const panelOf = (agent) => document.getElementById(`panel-${agent}`);
  const setAgentState = (agent, state) => {
    const panel = panelOf(agent);
    if (panel) panel.dataset.state = state;
    const tab = document.getElementById(`tab-${agent}`);
    if (!tab) return;
    const dot = tab.querySelector(".dot");
    if (dot) dot.className = `dot ${state}`;
    const words = tab.querySelector(".state-text");
    if (words) words.textContent = page.state_text[state] || state;
  };

  // The progress bar's clocks run between events: elapsed up, remaining down.
  const duration = (ms) => {
    if (ms < 1000) return `${Math.round(Math.max(ms, 0))} ms`;
    const seconds = ms / 1000;
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    if (seconds < 60) return `${Math.round(seconds)} s`;
    const whole = Math.round(seconds);
    return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")} min`;
  };
  let clock = null;
  const readClock = () => {
    const box = progressBox && progressBox.querySelector(".progress-box");
    clock = box && box.dataset.status === "running" ? {
      box,
      since: performance.now(),
      elapsed: Number(box.dataset.elapsedMs || 0),
      remaining: Number(box.dataset.remainingMs || 0),
    } : null;
  };
  setInterval(() => {
    if (!clock) return;
    const passed = performance.now() - clock.since;
    const elapsed = clock.box.querySelector('[data-clock="elapsed"]');
    if (elapsed) elapsed.textContent = duration(clock.elapsed + passed);
    const remaining = clock.box.querySelector('[data-clock="remaining"]');
    if (remaining) remaining.textContent = duration(clock.remaining - passed);
  }, 1000);
  readClock();
  const setProgress = (progress) => {
    if (!progress) return;
    if (progressBox) progressBox.replaceChildren(fragment(progress.progress_html));
    if (timelineChart) timelineChart.replaceChildren(fragment(progress.timeline_html));
    readClock();
  };

  const setStatus = (design) => {
    terminal = design.terminal;
    document.getElementById("design-state").replaceChildren(fragment(design.status_html));
    document.getElementById("failure-text").replaceChildren(fragment(design.failure_html));
    document.getElementById("design-failure").hidden = !design.retryable;
    const cancelForm = document.getElementById("cancel-form");
    if (cancelForm) {
      cancelForm.hidden = terminal;
      document.getElementById("delete-form").hidden = !terminal;
    }
  };

  const timelineRow = (run) => {
    // One row per run: a resumed agent gets a new one.
    const row = fragment(run.row_html).querySelector("tr");
    const shown = timeline.querySelector(`tr[data-key="${run.run_id}"]`);
    if (shown) shown.replaceWith(row);
    else timeline.append(row);
  };

  const liveParts = (agent) => {
    const panel = panelOf(agent);
    return panel && {
      panel,
      live: panel.querySelector(".panel-live"),
      meta: panel.querySelector(".live-meta"),
      stream: panel.querySelector(".stream"),
      body: panel.querySelector(".panel-body"),
    };
  };

  // --- streamed text -------------------------------------------------------------------------
  // Per agent, the run being written and how many characters of its text the page has. Each
  // `tokens` event says where its text starts (`offset`), so only what lies beyond is added.
  // A page that joined mid-answer holds the tokens until the text so far (`text`, sent by the
  // process running the design) arrives, then adds what they bring beyond it. A gap (tokens
  // lost on the way) asks for a snapshot, which brings the text so far again.
  const TEXT_WAIT_MS = 5000;
  const streams = {};
  const characters = (text) => Array.from(text); // code points, as the server counts them

  const writingMeta = (run) => {
    const round = run.round ? `Round ${run.round + 1} (a revision) · ` : "";
    return `${round}${run.pool} pool · ${run.model} · writing…`;
  };

  const openStream = (run, joinedLate) => {
    const parts = liveParts(run.agent);
    if (!parts) return;
    const previous = streams[run.agent];
    if (previous) clearTimeout(previous.giveUp);
    const stream = { runId: run.run_id, have: 0, synced: !joinedLate, held: [], giveUp: null };
    streams[run.agent] = stream;
    parts.stream.textContent = "";
    parts.meta.textContent = writingMeta(run);
    parts.live.hidden = false;
    parts.body.hidden = true;
    setAgentState(run.agent, "running");
    if (joinedLate) waitForText(run.agent, stream);
  };

  const waitForText = (agent, stream) => {
    clearTimeout(stream.giveUp);
    stream.giveUp = setTimeout(() => {
      // No answer (the design's process is gone or busy): show what streams from now on.
      const parts = liveParts(agent);
      if (parts) parts.meta.textContent += " (the text before this point appears when it finishes)";
      stream.have = stream.held.length ? stream.held[0].offset : stream.have;
      release(agent, stream);
    }, TEXT_WAIT_MS);
  };

  const release = (agent, stream) => {
    clearTimeout(stream.giveUp);
    stream.synced = true;
    const held = stream.held;
    stream.held = [];
    for (const tokens of held) addTokens(tokens);
  };

  const addTokens = (event) => {
    const stream = streams[event.agent];
    const parts = liveParts(event.agent);
    if (!stream || !parts || stream.runId !== event.run_id) return;
    if (!stream.synced) {
      stream.held.push(event);
      return;
    }
    if (event.offset > stream.have) {
      stream.synced = false;
      stream.held.push(event);
      waitForText(event.agent, stream);
      askForSnapshot();
      return;
    }
    const text = characters(event.text);
    const known = stream.have - event.offset;
    if (known >= text.length) return; // already shown
    parts.stream.append(document.createTextNode(text.slice(known).join("")));
    stream.have += text.length - known;
    if (!parts.panel.hidden) parts.stream.scrollTop = parts.stream.scrollHeight;
  };

  const addTextSoFar = (event) => {
    const stream = streams[event.agent];
    const parts = liveParts(event.agent);
    if (!stream || !parts || stream.runId !== event.run_id) return;
    const length = characters(event.text).length;
    if (length > stream.have) {
      parts.stream.textContent = event.text;
      stream.have = length;
    }
    release(event.agent, stream);
  };

  const startAgent = (event) => {
    openStream(event, false);
    followAgent(event.agent);
    announce(event.announcement);
  };

  const loadRun = async (agent, runId) => {
    const parts = liveParts(agent);
    if (!parts || !runId) return;
    const response = await fetch(`${page.runs}${runId}/`, { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const run = await response.json();
    parts.body.innerHTML = run.html; // rendered and sanitised by the server
    parts.body.hidden = false;
    parts.live.hidden = true;
    parts.panel.dataset.runId = String(run.run_id);
    setAgentState(agent, run.status);
    focusableBlocks(parts.body);
    drawDiagrams(parts.body);
  };

  const finishAgent = (event) => {
    timelineRow(event);
    setProgress(event.progress);
    announce(event.announcement);
    const parts = liveParts(event.agent);
    if (!parts) return;
    if (event.status === "succeeded") {
      loadRun(event.agent, event.run_id);
    } else {
      setAgentState(event.agent, event.status);
      const how = event.status === "stopped" ? "was stopped before it finished" : "failed";
      const round = event.round ? ` (round ${event.round + 1})` : "";
      parts.meta.textContent = `${event.title}${round} ${how}: ${event.error || "no cause recorded"}`;
      parts.live.hidden = false;
    }
  };

  const applySnapshot = (state) => {
    setStatus(state.design);
    setProgress(state.progress);
    const latest = {};
    for (const run of state.runs) {
      timelineRow(run);
      latest[run.agent] = run;
    }
    let newest = null;
    for (const run of Object.values(latest)) {
      const panel = panelOf(run.agent);
      if (!panel) continue;
      if (run.status === "running") {
        const stream = streams[run.agent];
        if (!stream || stream.runId !== run.run_id) openStream(run, true);
        if (!newest || run.run_id > newest.run_id) newest = run;
      } else if (run.status === "succeeded" && panel.dataset.runId !== String(run.run_id)) {
        loadRun(run.agent, run.run_id);
      } else if (run.status === "failed" || run.status === "stopped") {
        setAgentState(run.agent, run.status);
      }
    }
    if (newest) followAgent(newest.agent);
  };

  const handle = (event) => {
    switch (event.kind) {
      case "snapshot": applySnapshot(event); break;
      case "agent_started":
        timelineRow(event);
        setProgress(event.progress);
        startAgent(event);
        break;
      case "tokens": addTokens(event); break;
      case "text": addTextSoFar(event); break;
      case "agent_finished": finishAgent(event); break;
      case "design_status":
        setStatus(event);
        setProgress(event.progress);
        announce(event.announcement);
        if (terminal && socket) socket.close(1000, "design finished");
        break;
      default: break;
    }
  };

  let retryDelay = 500;
  let socket = null;
  let snapshotAsked = false;
  const askForSnapshot = () => {
    if (snapshotAsked || !socket || socket.readyState !== WebSocket.OPEN) return;
    snapshotAsked = true;
    socket.send(JSON.stringify({ kind: "snapshot" }));
    setTimeout(() => { snapshotAsked = false; }, 1000);
  };
  const connect = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}${page.socket}`);
    socket.addEventListener("open", () => {
      retryDelay = 500;
      connection.textContent = "● live";
    });
    socket.addEventListener("message", (message) => handle(JSON.parse(message.data)));
    // The server's close codes (agents/consumers.py): 4403 no login, 4404 no such design,
    // 4400 / 4413 a message it refused (this page sends none), 4401 the login this socket was
    // opened with ended (a logout, a password change, expiry): reconnecting asks the server
    // with the browser's current cookie, which answers 4403 if there is no login left.
    socket.addEventListener("close", (close) => {
      if (close.code === 4403) {
        connection.textContent = "Log in again to follow this design live.";
        return;
      }
      if (close.code === 4404) {
        connection.textContent = "This design is not available.";
        return;
      }
      if (close.code === 4400 || close.code === 4413) {
        connection.textContent = "The live view stopped; reload the page to follow again.";
        return;
      }
      if (terminal) {
        connection.textContent = "";
        return;
      }
      connection.textContent =
        close.code === 4401 ? "Your session changed; checking…" : "reconnecting…";
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 10000);
    });
  };
  if (!terminal) connect();
})();
