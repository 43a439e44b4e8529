// The coordinator dashboard: polls the JSON API and draws the selected run with plotly.
//
// Everything that comes from the network (run ids, peer ids, model names) is inserted with
// textContent / DOM properties, never as HTML: peers choose their own ids.
//
// For tests and for people debugging the page, <body> carries data- attributes:
//   data-ready="1"         after the first successful render
//   data-loss-points="N"   points in the loss plot (history points with a loss)
//   data-step-points="N"   points in the global-step plot
//   data-peer-rows="N"     rows in the peers table
//   data-bytes-sent="N"    the selected run's averaging bytes sent (latest point, all online peers; "" if unknown)
//   data-bytes-received="N", data-utilisation="X"   the same for bytes received and mean compute utilisation
//   data-fetch-errors="N"  API requests that failed (network down, server error)
//   data-errors="N"        script errors recorded in <pre id="errors">
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const PLOT_CONFIG = { displayModeBar: false, responsive: true };

  // -- error capture: the page shows its own failures instead of silently freezing ------------------
  let errorCount = 0;

  function recordError(message) {
    errorCount += 1;
    const box = document.getElementById("errors");
    document.body.dataset.errors = String(errorCount);
    if (box) {
      box.hidden = false;
      box.textContent += message + "\n";
    }
  }

  // Capture phase: resource load failures (a missing script) do not bubble, but are seen here.
  window.addEventListener(
    "error",
    (event) => {
      if (event instanceof ErrorEvent) {
        recordError(`${event.message} (${event.filename}:${event.lineno})`);
      } else if (event.target && (event.target.src || event.target.href)) {
        recordError(`failed to load ${event.target.src || event.target.href}`);
      }
    },
    true,
  );
  window.addEventListener("unhandledrejection", (event) => {
    const reason = event.reason;
    recordError(`unhandled rejection: ${reason && reason.stack ? reason.stack : reason}`);
  });

  // -- small helpers -----------------------------------------------------------------------------------
  class FetchError extends Error {}

  async function getJSON(url) {
    let response;
    try {
      response = await fetch(url, { cache: "no-store" });
    } catch (err) {
      throw new FetchError(`cannot reach the coordinator (${err.message})`);
    }
    if (response.status === 404) return null;
    if (!response.ok) throw new FetchError(`${url} answered ${response.status}`);
    return response.json();
  }

  // Build an element; string children become text nodes, so they are never parsed as HTML.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmtNumber(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function fmtLoss(value) {
    return value === null || value === undefined ? "–" : Number(value).toPrecision(4);
  }

  // Binary units, as the benchmarks report them; averaging totals reach GiB on long runs.
  function fmtBytes(value) {
    if (value === null || value === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let scaled = Number(value);
    let unit = 0;
    while (scaled >= 1024 && unit < units.length - 1) {
      scaled /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${scaled} B` : `${scaled.toFixed(1)} ${units[unit]}`;
  }

  function fmtPercent(fraction) {
    return fraction === null || fraction === undefined ? "–" : `${(100 * fraction).toFixed(1)} %`;
  }

  function fmtAge(seconds) {
    if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    return `${(seconds / 3600).toFixed(1)} h ago`;
  }

  function fmtTime(t) {
    return new Date(t * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" });
  }

  function shortPeerId(peerId) {
    // libp2p ids share a long common prefix ("12D3KooW..."); the tail is what tells peers apart.
    return peerId.length > 16 ? `${peerId.slice(0, 6)}…${peerId.slice(-6)}` : peerId;
  }

  function runLink(runId) {
    const url = new URL(window.location.href);
    url.search = new URLSearchParams({ run: runId }).toString();
    return url.pathname + url.search;
  }

  function progressCell(step, maxSteps) {
    if (step === null || step === undefined) return el("td", {}, "–");
    if (!maxSteps) return el("td", {}, String(step));
    const bar = el("span", { className: "progress" }, el("span"));
    bar.firstChild.style.width = `${Math.min(100, (100 * step) / maxSteps)}%`;
    return el("td", {}, bar, `${step} / ${maxSteps}`);
  }

  // -- rendering ---------------------------------------------------------------------------------------
  function renderRuns(runs, selectedId) {
    const rows = runs.map((run) => {
      const latest = run.latest || {};
      const row = el(
        "tr",
        {},
        el("td", { className: "clip", title: run.run_id }, el("a", { href: runLink(run.run_id), className: "mono" }, run.run_id)),
        el("td", {}, el("span", { className: `badge ${run.status}` }, run.status)),
        el("td", { className: "mono clip", title: run.model || "" }, run.model || "–"),
        el("td", {}, run.stage || "–"),
        progressCell(latest.global_step, run.max_global_steps),
        el("td", { className: "num" }, fmtLoss(latest.loss)),
        el("td", { className: "num" }, fmtNumber(latest.samples_per_second, 1)),
        el("td", { className: "num" }, latest.peers === undefined ? "–" : String(latest.peers)),
        el(
          "td",
          { className: "num" },
          latest.bytes_sent === null || latest.bytes_sent === undefined
            ? "–"
            : `${fmtBytes(latest.bytes_sent)} / ${fmtBytes(latest.bytes_received)}`,
        ),
        el("td", { className: "num" }, fmtPercent(latest.compute_utilisation)),
        el("td", {}, fmtTime(run.created_at)),
      );
      if (run.run_id === selectedId) row.className = "selected";
      return row;
    });
    document.getElementById("runs-body").replaceChildren(...rows);
    document.getElementById("no-runs").hidden = runs.length > 0;
  }

  function lineTrace(times, values, extra) {
    return Object.assign(
      { x: times, y: values, type: "scatter", mode: "lines+markers", marker: { size: 4 }, connectgaps: false },
      extra,
    );
  }

  function plotLayout(yTitle) {
    return {
      margin: { l: 56, r: 12, t: 8, b: 36 },
      xaxis: { type: "date" },
      yaxis: { title: { text: yTitle }, rangemode: "tozero", automargin: true },
      showlegend: false,
      font: { size: 11 },
    };
  }

  // Gaps (null) stay gaps: points from an older coordinator, or before any peer reported accounting.
  function mib(bytes) {
    return bytes === null || bytes === undefined ? null : bytes / 2 ** 20;
  }

  function percent(fraction) {
    return fraction === null || fraction === undefined ? null : 100 * fraction;
  }

  async function renderPlots(history) {
    // Date objects: plotly reads them in the viewer's local time zone.
    const times = history.map((p) => new Date(p.t * 1000));
    const losses = history.map((p) => p.loss);
    const lossLayout = plotLayout("loss");
    lossLayout.yaxis.rangemode = "normal";
    await Promise.all([
      Plotly.react("plot-loss", [lineTrace(times, losses, { line: { color: "#cf222e" } })], lossLayout, PLOT_CONFIG),
      Plotly.react(
        "plot-step",
        [lineTrace(times, history.map((p) => p.global_step), { line: { color: "#0969da", shape: "hv" } })],
        plotLayout("global step"),
        PLOT_CONFIG,
      ),
      Plotly.react(
        "plot-throughput",
        [lineTrace(times, history.map((p) => p.samples_per_second), { line: { color: "#1a7f37" } })],
        plotLayout("samples/s"),
        PLOT_CONFIG,
      ),
      Plotly.react(
        "plot-peers",
        [lineTrace(times, history.map((p) => p.peers), { line: { color: "#8250df", shape: "hv" } })],
        Object.assign(plotLayout("peers"), { yaxis: { title: { text: "peers" }, rangemode: "tozero", dtick: 1 } }),
        PLOT_CONFIG,
      ),
      Plotly.react(
        "plot-bytes",
        [
          lineTrace(times, history.map((p) => mib(p.bytes_sent)), { name: "sent", line: { color: "#bc4c00" } }),
          lineTrace(times, history.map((p) => mib(p.bytes_received)), {
            name: "received",
            line: { color: "#0550ae", dash: "dot" },
          }),
        ],
        Object.assign(plotLayout("MiB"), { showlegend: true, legend: { orientation: "h", y: 1.15 } }),
        PLOT_CONFIG,
      ),
      Plotly.react(
        "plot-utilisation",
        [lineTrace(times, history.map((p) => percent(p.compute_utilisation)), { line: { color: "#1a7f37" } })],
        Object.assign(plotLayout("% of wall time"), { yaxis: { title: { text: "% of wall time" }, range: [0, 100] } }),
        PLOT_CONFIG,
      ),
    ]);
    document.body.dataset.lossPoints = String(losses.filter((v) => v !== null).length);
    document.body.dataset.stepPoints = String(times.length);
  }

  function renderPeers(peers, serverTime) {
    const rows = peers.map((peer) =>
      el(
        "tr",
        {},
        el("td", { className: "mono", title: peer.peer_id }, shortPeerId(peer.peer_id)),
        el("td", { className: "num" }, String(peer.global_step)),
        el("td", { className: "num" }, fmtLoss(peer.loss)),
        el("td", { className: "num" }, fmtNumber(peer.samples_per_second, 1)),
        el("td", { className: "num" }, String(peer.samples_total)),
        el("td", { className: "num bytes-sent" }, fmtBytes(peer.bytes_sent)),
        el("td", { className: "num bytes-received" }, fmtBytes(peer.bytes_received)),
        el("td", { className: "num utilisation" }, fmtPercent(peer.compute_utilisation)),
        el("td", { className: "num" }, fmtAge(serverTime - peer.reported_at)),
      ),
    );
    document.getElementById("peers-body").replaceChildren(...rows);
    document.getElementById("no-peers").hidden = peers.length > 0;
    document.body.dataset.peerRows = String(rows.length);
  }

  async function renderRun(runId, detail) {
    document.getElementById("run-detail").hidden = false;
    document.getElementById("run-title").textContent = runId;
    const missing = document.getElementById("run-missing");
    missing.hidden = detail !== null;
    document.getElementById("run-charts").hidden = detail === null;
    if (detail === null) {
      missing.textContent = `No run with id "${runId}".`;
      return;
    }
    await renderPlots(detail.history);
    renderAccounting(detail.history.length ? detail.history[detail.history.length - 1] : null);
    renderPeers(detail.peers, detail.server_time);
  }

  function renderAccounting(latest) {
    const point = latest || {};
    const known = (value) => (value === null || value === undefined ? "" : String(value));
    document.getElementById("run-bytes-sent").textContent = fmtBytes(point.bytes_sent);
    document.getElementById("run-bytes-received").textContent = fmtBytes(point.bytes_received);
    document.getElementById("run-utilisation").textContent = fmtPercent(point.compute_utilisation);
    document.getElementById("run-waiting").textContent =
      point.compute_utilisation === null || point.compute_utilisation === undefined
        ? "–"
        : fmtPercent(1 - point.compute_utilisation);
    document.body.dataset.bytesSent = known(point.bytes_sent);
    document.body.dataset.bytesReceived = known(point.bytes_received);
    document.body.dataset.utilisation = known(point.compute_utilisation);
  }

  // -- refresh loop ------------------------------------------------------------------------------------
  const requestedRun = new URLSearchParams(window.location.search).get("run");
  let fetchErrors = 0;

  async function refresh() {
    const status = document.getElementById("status");
    try {
      const runs = (await getJSON("/api/runs")) || [];
      const selected = requestedRun !== null ? requestedRun : runs.length ? runs[0].run_id : null;
      const detail = selected === null ? null : await getJSON(`/api/runs/${encodeURIComponent(selected)}`);
      renderRuns(runs, selected);
      if (selected === null) document.getElementById("run-detail").hidden = true;
      else await renderRun(selected, detail);
      status.textContent = `updated ${new Date().toLocaleTimeString()} · refreshes every ${REFRESH_MS / 1000} s`;
      status.classList.remove("stale");
      document.body.dataset.ready = "1";
    } catch (err) {
      if (!(err instanceof FetchError)) throw err; // a bug in this page: let the error handlers record it
      // The coordinator restarting is routine: say so and keep polling, showing the last data.
      fetchErrors += 1;
      document.body.dataset.fetchErrors = String(fetchErrors);
      status.textContent = `${err.message}; retrying`;
      status.classList.add("stale");
    } finally {
      // Chained rather than setInterval: a slow response never piles up overlapping requests.
      window.setTimeout(refresh, REFRESH_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (typeof Plotly === "undefined") {
      recordError("the chart library (/static/plotly.min.js) did not load");
      return;
    }
    refresh();
  });
})();
