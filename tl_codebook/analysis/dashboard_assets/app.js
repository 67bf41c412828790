// The code browser: an index of codebooks, client-side search, and one page per code.
// Data arrive as script files (data/<key>.js) that call TLCB.register(key, data); they are
// inserted only when a page needs them, so the site works from file:// and loads little.
// Every string that came from data is put in the page with textContent (via el()), never as
// HTML, so a token whose text is markup stays text.
"use strict";

(function () {
  const store = {};
  const waiting = {};

  function register(key, data) {
    store[key] = data;
    (waiting[key] || []).forEach(function (w) { w.resolve(data); });
    delete waiting[key];
  }

  // Load data/<key>.js once; keys are built from the site's own safe ids and integers.
  function load(key) {
    if (Object.prototype.hasOwnProperty.call(store, key)) return Promise.resolve(store[key]);
    return new Promise(function (resolve, reject) {
      if (waiting[key]) { waiting[key].push({ resolve: resolve, reject: reject }); return; }
      waiting[key] = [{ resolve: resolve, reject: reject }];
      const script = document.createElement("script");
      script.src = "data/" + key + ".js";
      script.onerror = function () {
        const ws = waiting[key] || [];
        delete waiting[key];
        script.remove();
        ws.forEach(function (w) { w.reject(new Error("missing data file data/" + key + ".js")); });
      };
      document.head.appendChild(script);
    });
  }

  window.TLCB = { register: register, load: load, store: store };

  // ---- DOM helpers (text only) ---------------------------------------------------------------

  function el(tag, attrs) {
    const node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        if (name === "text") node.textContent = attrs[name];
        else if (name === "className") node.className = attrs[name];
        else node.setAttribute(name, attrs[name]);
      });
    }
    for (let i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function append(node, child) {
    if (child === null || child === undefined) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }

  // The SVG namespace, read from the <svg> that index.html's parser made (the site holds no URL).
  function svg(tag, attrs) {
    const node = document.createElementNS(document.getElementById("svg-namespace").namespaceURI, tag);
    Object.keys(attrs || {}).forEach(function (name) { node.setAttribute(name, attrs[name]); });
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return String(x);
    return x.toFixed(digits === undefined ? 3 : digits);
  }

  function pct(x) { return (100 * x).toFixed(1) + "%"; }

  // Token text shown as code: whitespace made visible so " a" and "a" differ.
  function tokText(s) { return String(s).replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192"); }

  function table(columns, rows, numeric) {
    return el("table", null,
      el("tr", null, columns.map(function (c) { return el("th", { text: c }); })),
      rows.map(function (row) {
        return el("tr", null, row.map(function (cell, i) {
          if (cell instanceof Node) return el("td", null, cell);
          return el("td", { className: numeric && numeric[i] ? "num" : "", text: fmt(cell) });
        }));
      }));
  }

  // ---- site data -------------------------------------------------------------------------------

  function index() { return store.index; }
  function hookById(id) { return index().hooks.find(function (h) { return h.id === id; }); }
  function codeHref(hookId, group, code) { return "#/" + hookId + "/" + group + "/" + code; }
  function codeName(hook, group, code) {
    return hook.name + (hook.n_groups > 1 ? " · group " + group : "") + " · code " + code;
  }
  function blockKey(hookId, group, code) {
    const block = Math.floor(code / index().block_size);
    return "codes/" + hookId + "/g" + group + "/b" + String(block).padStart(4, "0");
  }
  function codeLink(hookId, group, code) {
    const hook = hookById(hookId);
    return el("a", { href: codeHref(hookId, group, code), text: hook ? codeName(hook, group, code) : code });
  }

  // Density histogram (log10 firing frequency of live codes); `mark` highlights one frequency.
  function histogram(hist, mark) {
    const W = 300, H = 96, pad = 16;
    const root = svg("svg", { width: W, height: H + pad, class: "hist", role: "img" });
    const counts = hist.counts;
    if (!counts.length) { root.appendChild(svg("text", { x: 4, y: 20 })).textContent = "no live codes"; return root; }
    const max = Math.max.apply(null, counts);
    const bw = (W - 8) / counts.length;
    const lo = hist.edges[0], hi = hist.edges[hist.edges.length - 1];
    let markBin = -1;
    if (mark !== undefined && mark > 0) {
      const v = Math.log10(mark);
      markBin = Math.min(counts.length - 1, Math.max(0, Math.floor((v - lo) / (hi - lo) * counts.length)));
    }
    counts.forEach(function (c, i) {
      const h = max ? (H - 4) * c / max : 0;
      const bar = svg("rect", { x: 4 + i * bw, y: H - h, width: Math.max(bw - 1, 1), height: h, class: i === markBin ? "mark" : "bar" });
      const title = svg("title", {});
      title.textContent = c + " codes, frequency 10^" + hist.edges[i].toFixed(2) + " to 10^" + hist.edges[i + 1].toFixed(2);
      bar.appendChild(title);
      root.appendChild(bar);
    });
    root.appendChild(svg("line", { x1: 4, y1: H, x2: W - 4, y2: H }));
    const left = svg("text", { x: 4, y: H + 12 }); left.textContent = "10^" + lo.toFixed(1);
    const right = svg("text", { x: W - 4, y: H + 12, "text-anchor": "end" }); right.textContent = "10^" + hi.toFixed(1);
    const mid = svg("text", { x: W / 2, y: H + 12, "text-anchor": "middle" }); mid.textContent = "firing frequency (log)";
    root.appendChild(left); root.appendChild(right); root.appendChild(mid);
    return root;
  }

  // ---- index page ----------------------------------------------------------------------------

  function renderIndex(app) {
    const data = index();
    app.appendChild(el("p", { className: "summary",
      text: data.n_tokens + " tokens (" + data.n_seq + " sequences × " + data.seq_len + ") · " +
        data.hooks.length + " codebook" + (data.hooks.length === 1 ? "" : "s") }));
    app.appendChild(searchPanel());
    if (data.steering) {
      app.appendChild(el("h2", { text: "Steering results" }));
      app.appendChild(table(data.steering.columns, data.steering.rows));
    }
    app.appendChild(el("h2", { text: "Codebooks" }));
    const cards = el("div", { className: "cards", id: "codebooks" });
    data.hooks.forEach(function (hook) {
      hook.groups.forEach(function (g, group) {
        const card = el("div", { className: "card" },
          el("div", { className: "name", text: hook.name + (hook.n_groups > 1 ? " · group " + group : "") }),
          el("div", { className: "stat", text: hook.num_codes + " codes · k = " + hook.k }),
          el("div", { className: "stat dead", text: g.dead + " dead codes (" + pct(g.dead / hook.num_codes) + ") never fire" }),
          histogram(g.histogram),
          el("div", { className: "stat", text: "most frequent:" }),
          el("div", null, g.top.map(function (pair, i) {
            return [i ? ", " : "", el("a", { href: codeHref(hook.id, group, pair[0]), text: String(pair[0]) }),
              el("span", { className: "muted", text: " (" + pair[1] + ")" })];
          })));
        cards.appendChild(card);
      });
    });
    app.appendChild(cards);
  }

  function searchPanel() {
    const mode = el("select", { id: "mode" },
      el("option", { value: "token", text: "token" }),
      el("option", { value: "regex", text: "regex over contexts" }),
      el("option", { value: "code", text: "code id" }));
    const input = el("input", { id: "q", type: "text", placeholder: "a token, a regex, or hook/group/code" });
    const button = el("button", { id: "go", type: "submit", text: "Search" });
    const status = el("div", { id: "search-status", className: "muted" });
    const results = el("div", { id: "results" });
    const form = el("form", { className: "search" }, el("strong", { text: "Search " }), mode, input, button, status, results);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      results.textContent = "";
      status.textContent = "searching…";
      status.setAttribute("data-state", "running");
      const q = input.value;
      const run = mode.value === "token" ? searchToken : mode.value === "regex" ? searchRegex : searchCode;
      run(q, results, status).catch(function (err) {
        status.textContent = "";
        results.appendChild(el("p", { className: "error", text: String(err.message || err) }));
      }).then(function () { status.setAttribute("data-state", "done"); });
    });
    return form;
  }

  function matchTable(rows) {
    // rows: [tokenText|null, hookId, group, code, precision, recall, count]
    return table(["token", "code", "precision", "recall", "count"], rows.map(function (r) {
      return [r[0] === null ? "" : el("span", { className: "tok", text: tokText(r[0]) }),
        codeLink(r[1], r[2], r[3]), r[4], r[5], r[6]];
    }), [false, false, true, true, true]);
  }

  function searchToken(q, results, status) {
    return load("vocab").then(function (vocab) {
      const exact = vocab.filter(function (v) { return v[1] === q; });
      const lower = q.toLowerCase();
      const partial = q === "" ? [] : vocab.filter(function (v) { return v[1] !== q && v[1].toLowerCase().indexOf(lower) >= 0; });
      const tokens = exact.concat(partial).slice(0, 20);
      if (!tokens.length) { status.textContent = "no token in the corpus matches " + JSON.stringify(q); return; }
      const size = index().token_block_size;
      return Promise.all(tokens.map(function (v) {
        return load("tokens/b" + String(Math.floor(v[0] / size)).padStart(4, "0"));
      })).then(function (blocks) {
        const rows = [];
        tokens.forEach(function (v, i) {
          (blocks[i][v[0]] || []).forEach(function (r) { rows.push([v[1], r[0], r[1], r[2], r[3], r[4], r[5]]); });
        });
        status.textContent = tokens.length + " token(s) matched; codes ranked by F1 per token";
        results.appendChild(matchTable(rows));
      });
    });
  }

  // Text of one shipped context, with the character span of its firing token.
  function contextText(ctx, vocab) {
    let text = "", start = 0, end = 0;
    ctx.t.forEach(function (t, i) {
      if (i === ctx.c) start = text.length;
      text += vocab[t];
      if (i === ctx.c) end = text.length;
    });
    return { text: text, start: start, end: end };
  }

  // Codes whose shipped top contexts match `q` on their firing token, ranked by how many do.
  function searchRegex(q, results, status) {
    let re;
    try { re = new RegExp(q, "g"); } catch (err) { return Promise.reject(new Error("invalid regex: " + err.message)); }
    const keys = [];
    index().hooks.forEach(function (hook) {
      for (let g = 0; g < hook.n_groups; g++) {
        for (let c = 0; c < hook.num_codes; c += index().block_size) keys.push([hook.id, g, blockKey(hook.id, g, c)]);
      }
    });
    const found = [];
    let done = 0;
    function next() {
      if (done === keys.length) return Promise.resolve();
      const item = keys[done];
      return load(item[2]).then(function (block) {
        Object.keys(block.codes).forEach(function (code) {
          const entry = block.codes[code];
          if (!entry.ctx || !entry.ctx.length) return;
          let hits = 0;
          entry.ctx.forEach(function (ctx) {
            const c = contextText(ctx, block.vocab);
            re.lastIndex = 0;
            let m;
            while ((m = re.exec(c.text)) !== null) {
              const s = m.index, e = m.index + m[0].length;
              if (s < c.end && (e > c.start || (e === s && s === c.start))) { hits++; break; }
              if (m[0].length === 0) re.lastIndex++;
            }
          });
          if (hits) found.push([item[0], item[1], Number(code), hits, entry.ctx.length, entry.n]);
        });
        done++;
        status.textContent = "searched " + done + " of " + keys.length + " blocks";
        return next();
      });
    }
    return next().then(function () {
      found.sort(function (a, b) { return (b[3] / b[4] - a[3] / a[4]) || (b[3] - a[3]) || (b[5] - a[5]); });
      status.textContent = found.length + " code(s) whose top contexts match on the firing token";
      results.appendChild(table(["code", "matching contexts", "count"], found.slice(0, 50).map(function (r) {
        return [codeLink(r[0], r[1], r[2]), r[3] + " of " + r[4], r[5]];
      }), [false, true, true]));
    });
  }

  // "17" (every codebook), "h00/17", "h00/0/17", or a hook name instead of h00.
  function searchCode(q, results, status) {
    const parts = q.trim().split(/[\/:\s]+/).filter(function (p) { return p.length; });
    const code = Number(parts[parts.length - 1]);
    if (!parts.length || !Number.isInteger(code) || code < 0) return Promise.reject(new Error("give a code id such as 17, h00/17 or h00/0/17"));
    const group = parts.length === 3 ? Number(parts[1]) : null;
    const hooks = index().hooks.filter(function (h) { return parts.length === 1 || h.id === parts[0] || h.name === parts[0]; });
    const rows = [];
    hooks.forEach(function (hook) {
      if (code >= hook.num_codes) return;
      for (let g = 0; g < hook.n_groups; g++) if (group === null || group === g) rows.push([hook.id, g, code]);
    });
    if (!rows.length) { status.textContent = "no such code (codebooks: " + index().hooks.map(function (h) { return h.id + " = " + h.name + ", " + h.num_codes + " codes"; }).join("; ") + ")"; return Promise.resolve(); }
    return Promise.all(rows.map(function (r) { return load(blockKey(r[0], r[1], r[2])); })).then(function (blocks) {
      status.textContent = rows.length + " code(s)";
      results.appendChild(table(["code", "count"], rows.map(function (r, i) {
        return [codeLink(r[0], r[1], r[2]), blocks[i].codes[r[2]].n];
      }), [false, true]));
    });
  }

  // ---- code page ----------------------------------------------------------------------------

  function renderCode(app, hookId, group, code) {
    const hook = hookById(hookId);
    if (!hook || !(group >= 0 && group < hook.n_groups) || !(code >= 0 && code < hook.num_codes)) {
      app.appendChild(el("p", { className: "error", text: "No such code: " + hookId + "/" + group + "/" + code }));
      return Promise.resolve();
    }
    return load(blockKey(hookId, group, code)).then(function (block) {
      const entry = block.codes[code];
      const vocab = block.vocab;
      const freq = entry.n / Math.max(index().n_tokens, 1);
      app.appendChild(el("h2", { id: "code-title", text: codeName(hook, group, code) }));
      app.appendChild(el("p", { className: "summary", text: "fires on " + entry.n + " of " + index().n_tokens +
        " tokens (frequency " + freq.toExponential(2) + ")" + (entry.n ? "" : ": a dead code") }));
      app.appendChild(el("h3", { text: "Density among this codebook's codes (this code in orange)" }));
      app.appendChild(histogram(hook.groups[group].histogram, entry.n ? freq : undefined));
      if (entry.n && !entry.ctx) {
        app.appendChild(el("p", { className: "muted", text: "Details were written only for the most frequent codes of this codebook." }));
        return;
      }
      if (!entry.n) return;
      app.appendChild(el("h3", { text: "Top contexts (firing token highlighted)" }));
      const box = el("div", { className: "contexts", id: "contexts" });
      entry.ctx.forEach(function (ctx) {
        const line = el("div", { className: "ctx" },
          el("span", { className: "where", text: "seq " + ctx.s + " pos " + ctx.p + (ctx.sc === null ? "" : " score " + fmt(ctx.sc)) }));
        ctx.t.forEach(function (t, i) {
          line.appendChild(el("span", { className: i === ctx.c ? "t fire" : "t", text: tokText(vocab[t]) }));
        });
        box.appendChild(line);
      });
      app.appendChild(box);
      const side = el("div", { className: "two" });
      app.appendChild(side);
      if (entry.co) {
        side.appendChild(el("div", null, el("h3", { text: "Co-firing codes (Jaccard over positions)" }),
          entry.co.length ? table(["code", "Jaccard"], entry.co.map(function (r) { return [codeLink(r[0], r[1], r[2]), r[3]]; }), [false, true])
            : el("p", { className: "muted", text: "none" })));
      }
      if (entry.lo) {
        const rows = function (list) { return list.map(function (r) { return [el("span", { className: "tok", text: tokText(vocab[r[0]]) }), r[1]]; }); };
        side.appendChild(el("div", null, el("h3", { text: "Logit effects: promoted tokens" }), table(["token", "logit"], rows(entry.lo.top), [false, true])));
        side.appendChild(el("div", null, el("h3", { text: "Logit effects: suppressed tokens" }), table(["token", "logit"], rows(entry.lo.bottom), [false, true])));
      }
      if (entry.sim) {
        side.appendChild(el("div", null, el("h3", { text: "Most similar code vectors (cosine)" }),
          table(["code", "cosine"], entry.sim.map(function (r) { return [codeLink(hookId, group, r[0]), r[1]]; }), [false, true])));
      }
      if (entry.pr) {
        const names = index().labels || [];
        side.appendChild(el("div", null, el("h3", { text: "Labelled concepts" }),
          entry.pr.length ? table(["label", "precision", "recall", "F1"], entry.pr.map(function (r) { return [String(names[r[0]]), r[1], r[2], r[3]]; }), [false, true, true, true])
            : el("p", { className: "muted", text: "fires on no labelled token" })));
      }
    });
  }

  // ---- routing --------------------------------------------------------------------------------

  function route() {
    const app = document.getElementById("app");
    app.textContent = "";
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter(function (p) { return p.length; });
    let done;
    if (parts.length === 3) done = renderCode(app, parts[0], Number(parts[1]), Number(parts[2]));
    else { renderIndex(app); done = Promise.resolve(); }
    done.catch(function (err) {
      app.appendChild(el("p", { className: "error", text: String(err.message || err) }));
    }).then(function () { document.body.setAttribute("data-ready", location.hash || "#/"); });
  }

  function start() {
    if (!store.index) {
      document.getElementById("app").textContent = "data/index.js did not load: is the site complete?";
      return;
    }
    document.getElementById("title").textContent = store.index.title;
    document.title = "Code browser: " + store.index.title;
    window.addEventListener("hashchange", route);
    route();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
