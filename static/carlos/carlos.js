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
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
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
  if (tabs.length) {
    tabs.forEach((tab, index) => {
      tab.addEventListener("click", () => selectTab(tab, true));
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (!step) return;
        const next = tabs[(index + step + tabs.length) % tabs.length];
        next.focus();
        selectTab(next, true);
      });
    });
    const tabFromHash = () => {
      const wanted = document.getElementById(`tab-${location.hash.slice(1)}`);
      return wanted && tabs.includes(wanted) ? wanted : null;
    };
    selectTab(tabFromHash() || tabs[0], false);
    window.addEventListener("hashchange", () => {
      const wanted = tabFromHash();
      if (wanted) selectTab(wanted, false);
    });
  }

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
  // The server sends the design's status line, its failure text and each timeline row
  // rendered (agents/events.py, the page's own templates, escaped there): they are swapped
  // in whole, so this script knows no status labels and no table columns.
  const connection = document.getElementById("connection");
  const timeline = document.querySelector("#timeline tbody");
  let terminal = page.terminal;

  const panelOf = (agent) => document.getElementById(`panel-${agent}`);
  const dotOf = (agent) => document.querySelector(`#tab-${agent} .dot`);
  const setAgentState = (agent, state) => {
    const panel = panelOf(agent);
    if (panel) panel.dataset.state = state;
    const dot = dotOf(agent);
    if (dot) dot.className = `dot ${state}`;
  };

  const fragment = (html) => {
    const template = document.createElement("template");
    template.innerHTML = html; // rendered and escaped by the server
    return template.content;
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

  const startAgent = (event, joinedLate) => {
    const parts = liveParts(event.agent);
    if (!parts) return;
    parts.panel.dataset.round = String(event.round);
    parts.stream.textContent = "";
    parts.meta.textContent = `Round ${event.round} · ${event.pool} pool · ${event.model} · writing…` +
      (joinedLate ? " (joined mid-answer: the full text appears when it finishes)" : "");
    parts.live.hidden = false;
    parts.body.hidden = true;
    setAgentState(event.agent, "running");
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
    drawDiagrams(parts.body);
  };

  const finishAgent = (event) => {
    timelineRow(event);
    const parts = liveParts(event.agent);
    if (!parts) return;
    if (event.status === "succeeded") {
      loadRun(event.agent, event.run_id);
    } else {
      setAgentState(event.agent, event.status);
      const how = event.status === "stopped" ? "stopped before it finished" : "failed";
      parts.meta.textContent = `Round ${event.round} ${how}: ${event.error || "no cause recorded"}`;
      parts.live.hidden = false;
    }
  };

  const applySnapshot = (state) => {
    setStatus(state.design);
    const latest = {};
    for (const run of state.runs) {
      timelineRow(run);
      latest[run.agent] = run;
    }
    for (const run of Object.values(latest)) {
      const panel = panelOf(run.agent);
      if (!panel) continue;
      if (run.status === "running") {
        if (panel.dataset.state !== "running" || panel.dataset.round !== String(run.round)) {
          startAgent(run, true);
        }
      } else if (run.status === "succeeded" && panel.dataset.runId !== String(run.run_id)) {
        loadRun(run.agent, run.run_id);
      } else if (run.status === "failed" || run.status === "stopped") {
        setAgentState(run.agent, run.status);
      }
    }
  };

  const handle = (event) => {
    switch (event.kind) {
      case "snapshot": applySnapshot(event); break;
      case "agent_started": startAgent(event, false); timelineRow(event); break;
      case "tokens": {
        const parts = liveParts(event.agent);
        if (parts && parts.panel.dataset.round === String(event.round)) {
          parts.stream.append(document.createTextNode(event.text));
          if (!parts.panel.hidden) parts.stream.scrollTop = parts.stream.scrollHeight;
        }
        break;
      }
      case "agent_finished": finishAgent(event); break;
      case "design_status":
        setStatus(event);
        if (terminal && socket) socket.close(1000, "design finished");
        break;
      default: break;
    }
  };

  let retryDelay = 500;
  let socket = null;
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
