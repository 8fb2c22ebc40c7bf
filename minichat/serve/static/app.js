// minichat web chat: conversations kept by the server's store, replies streamed as server-sent events.
// Messages form a tree (editing a question or regenerating an answer adds a sibling); the page shows the path
// from the root to the conversation's current leaf, with "‹ 2/3 ›" to switch between siblings.
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var state = {
    config: null, convs: [], conv: null, byId: {}, path: [],
    streaming: null,      // {controller, assistantId}
    compareWith: {},      // new answer id -> previous answer id (ask "better or worse?" after a regenerate)
  };
  var SETTINGS_KEY = "minichat.settings", KEY_KEY = "minichat.apiKey";

  // ------------------------------------------------------------------ HTTP
  function headers() {
    var h = { "Content-Type": "application/json" };
    var k = localStorage.getItem(KEY_KEY);
    if (k) h["Authorization"] = "Bearer " + k;
    return h;
  }
  function api(method, url, body) {
    return fetch(url, { method: method, headers: headers(), body: body ? JSON.stringify(body) : undefined })
      .then(function (r) {
        return r.text().then(function (t) {
          var data = t ? JSON.parse(t) : null;
          if (!r.ok) {
            var msg = (data && data.error && data.error.message) || r.statusText;
            if (r.status === 401) { showSettings(true); msg += " (enter an API key in Settings)"; }
            throw new Error(msg);
          }
          return data;
        });
      });
  }
  function setStatus(text, isError) {
    var s = $("status"); s.textContent = text || ""; s.className = isError ? "error" : "";
  }

  // ------------------------------------------------------------------ settings
  function readSettings() {
    var s = { temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
              max_tokens: parseInt($("max-tokens").value, 10) };
    var seed = $("seed").value.trim();
    if (seed !== "") s.seed = parseInt(seed, 10);
    Object.keys(s).forEach(function (k) { if (typeof s[k] === "number" && isNaN(s[k])) delete s[k]; });
    return s;
  }
  function writeSettings(s, systemPrompt) {
    s = s || {};
    var d = (state.config && state.config.defaults) || {};
    $("temperature").value = s.temperature != null ? s.temperature : (d.temperature != null ? d.temperature : 0.7);
    $("top-p").value = s.top_p != null ? s.top_p : (d.top_p != null ? d.top_p : 0.95);
    $("max-tokens").value = s.max_tokens != null ? s.max_tokens : (d.max_tokens || 512);
    $("seed").value = s.seed != null ? s.seed : "";
    $("system-prompt").value = systemPrompt || "";
  }
  function saveSettings() {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify({ settings: readSettings(), system_prompt: $("system-prompt").value,
                                                         model: $("model-select").value }));
    if (state.conv) {
      api("PATCH", "/api/conversations/" + state.conv.id, { settings: readSettings(),
        system_prompt: $("system-prompt").value, model: $("model-select").value }).catch(function (e) { setStatus(e.message, true); });
    }
  }
  function showSettings(open) {
    $("settings").hidden = !open; $("settings-toggle").setAttribute("aria-expanded", String(open));
  }

  // ------------------------------------------------------------------ conversations
  function loadConfig() {
    return api("GET", "/api/config").then(function (cfg) {
      state.config = cfg;
      var sel = $("model-select"); sel.innerHTML = "";
      cfg.models.forEach(function (m) {
        var o = document.createElement("option"); o.value = m; o.textContent = m; sel.appendChild(o);
      });
      var saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null");
      sel.value = (saved && cfg.models.indexOf(saved.model) >= 0) ? saved.model : cfg.default_model;
      writeSettings(saved ? saved.settings : cfg.defaults, saved ? saved.system_prompt : "");
    });
  }
  function loadList() {
    return api("GET", "/api/conversations").then(function (r) { state.convs = r.data; renderList(); });
  }
  function renderList() {
    var nav = $("conv-list"); nav.innerHTML = "";
    state.convs.forEach(function (c) {
      var row = document.createElement("div");
      row.className = "conv" + (state.conv && state.conv.id === c.id ? " active" : "");
      row.dataset.id = c.id;
      var t = document.createElement("span"); t.className = "title"; t.textContent = c.title; row.appendChild(t);
      var del = document.createElement("button"); del.className = "del"; del.type = "button"; del.title = "Delete";
      del.textContent = "✕";
      del.onclick = function (ev) {
        ev.stopPropagation();
        if (!confirm("Delete this conversation?")) return;
        api("DELETE", "/api/conversations/" + c.id).then(function () {
          if (state.conv && state.conv.id === c.id) newChat();
          return loadList();
        }).catch(function (e) { setStatus(e.message, true); });
      };
      row.appendChild(del);
      row.onclick = function () { openConversation(c.id); };
      nav.appendChild(row);
    });
  }
  function openConversation(id) {
    if (state.streaming) return;
    return api("GET", "/api/conversations/" + id).then(function (c) {
      setConversation(c);
      if (c.model && state.config.models.indexOf(c.model) >= 0) $("model-select").value = c.model;
      writeSettings(c.settings, c.system_prompt);
      renderList();
    }).catch(function (e) { setStatus(e.message, true); });
  }
  function setConversation(c) {
    state.conv = c; state.byId = {};
    (c.messages || []).forEach(function (m) { state.byId[m.id] = m; });
    state.path = c.path || [];
    $("conv-title").textContent = c.title || "";
    history.replaceState(null, "", "#" + c.id);
    renderMessages();
  }
  function newChat() {
    if (state.streaming) return;
    state.conv = null; state.byId = {}; state.path = [];
    $("conv-title").textContent = "";
    history.replaceState(null, "", location.pathname);
    var saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null");
    writeSettings(saved ? saved.settings : state.config.defaults, saved ? saved.system_prompt : "");
    renderMessages(); renderList(); $("input").focus();
  }
  function ensureConversation() {
    if (state.conv) return Promise.resolve(state.conv);
    return api("POST", "/api/conversations", { model: $("model-select").value, system_prompt: $("system-prompt").value,
                                                settings: readSettings() })
      .then(function (c) { c.messages = []; c.path = []; setConversation(c); return c; });
  }

  // ------------------------------------------------------------------ tree helpers
  function children(parentId) {
    return Object.keys(state.byId).map(function (k) { return state.byId[k]; })
      .filter(function (m) { return (m.parent_id || null) === (parentId || null); })
      .sort(function (a, b) { return a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : 0; });
  }
  function deepestLeaf(id) {  // follow the newest child down, as ChatGPT shows a branch you switch to
    var kids = children(id);
    while (kids.length) { id = kids[kids.length - 1].id; kids = children(id); }
    return id;
  }
  function pathTo(leaf) {
    var out = [];
    while (leaf && state.byId[leaf]) { out.push(leaf); leaf = state.byId[leaf].parent_id; }
    return out.reverse();
  }
  function switchTo(id) {
    var leaf = deepestLeaf(id);
    state.path = pathTo(leaf); renderMessages();
    api("PATCH", "/api/conversations/" + state.conv.id, { current_leaf_id: leaf }).catch(function (e) { setStatus(e.message, true); });
  }

  // ------------------------------------------------------------------ rendering
  function renderMessages() {
    var box = $("messages"); box.innerHTML = "";
    if (!state.path.length) {
      var e = document.createElement("div"); e.id = "empty"; e.className = "empty";
      e.innerHTML = "<h1>minichat</h1><p>Ask anything. Replies are generated by a small model and may be wrong.</p>";
      box.appendChild(e); return;
    }
    state.path.forEach(function (id, i) { box.appendChild(renderMessage(state.byId[id], i === state.path.length - 1)); });
    box.scrollTop = box.scrollHeight;
  }
  function button(label, title, onclick, cls) {
    var b = document.createElement("button"); b.type = "button"; b.textContent = label; b.title = title;
    if (cls) b.className = cls;
    b.onclick = onclick; return b;
  }
  function renderMessage(m, isLast) {
    var div = document.createElement("div");
    div.className = "msg " + m.role; div.dataset.id = m.id;
    if (m.moderated) {
      var note = document.createElement("div"); note.className = "moderation-note";
      var cats = (m.moderation && m.moderation.categories && m.moderation.categories.length)
        ? " (" + m.moderation.categories.join(", ") + ")" : "";
      note.textContent = (m.moderation && m.moderation.source === "input"
        ? "Moderation flagged the message; the model was not asked" : "Moderation replaced this reply") + cats + ".";
      div.appendChild(note);
    }
    var bubble = document.createElement("div"); bubble.className = "bubble";
    if (m.role === "assistant") bubble.innerHTML = MiniMarkdown.render(m.content);
    else bubble.textContent = m.content;
    div.appendChild(bubble);
    if (m.finish_reason === "stopped") {
      var st = document.createElement("div"); st.className = "stopped-note"; st.textContent = "Stopped"; div.appendChild(st);
    } else if (m.finish_reason === "length") {
      var ln = document.createElement("div"); ln.className = "meta-note"; ln.textContent = "Reached the token limit"; div.appendChild(ln);
    } else if (m.finish_reason === "error") {
      var er = document.createElement("div"); er.className = "meta-note"; er.textContent = "Generation failed"; div.appendChild(er);
    }
    var actions = document.createElement("div"); actions.className = "actions";
    var sibs = children(m.parent_id).filter(function (x) { return x.role === m.role; });
    if (sibs.length > 1) {
      var k = sibs.findIndex(function (x) { return x.id === m.id; });
      var nav = document.createElement("span"); nav.className = "siblings";
      nav.appendChild(button("‹", "Previous version", function () { if (k > 0) switchTo(sibs[k - 1].id); }, "prev"));
      var lab = document.createElement("span"); lab.className = "sib-label"; lab.textContent = (k + 1) + "/" + sibs.length;
      nav.appendChild(lab);
      nav.appendChild(button("›", "Next version", function () { if (k < sibs.length - 1) switchTo(sibs[k + 1].id); }, "next"));
      actions.appendChild(nav);
    }
    if (m.role === "user") {
      actions.appendChild(button("Edit", "Edit and resend", function () { startEdit(div, m); }, "edit"));
    } else if (m.role === "assistant") {
      actions.appendChild(button("Copy", "Copy", function (ev) { copyText(m.content, ev.target); }, "copy"));
      var fb = m.feedback || {};
      actions.appendChild(button("👍", "Good answer", function () { rate(m, fb.rating === 1 ? null : 1, div); },
        "thumb-up" + (fb.rating === 1 ? " on" : "")));
      actions.appendChild(button("👎", "Bad answer", function () { rate(m, fb.rating === -1 ? null : -1, div); },
        "thumb-down" + (fb.rating === -1 ? " on" : "")));
      if (isLast && !state.streaming && m.parent_id) {
        actions.appendChild(button("↻ Regenerate", "Regenerate this answer", function () { regenerate(m); }, "regenerate"));
      }
    }
    div.appendChild(actions);
    var prev = state.compareWith[m.id];
    if (prev && state.byId[prev] && m.finish_reason && m.finish_reason !== "stopped") div.appendChild(compareBox(m, prev));
    div.querySelectorAll(".copy-code").forEach(function (b) {
      b.onclick = function () { copyText(b.closest(".code").querySelector("code").textContent, b); };
    });
    return div;
  }
  function compareBox(m, prevId) {
    var box = document.createElement("div"); box.className = "compare";
    var t = document.createElement("span"); t.textContent = "Was this answer better than the previous one?"; box.appendChild(t);
    function send(chosen, rejected, label) {
      var done = function () { delete state.compareWith[m.id]; box.textContent = label; };
      if (!chosen) { done(); return; }
      api("POST", "/api/comparisons", { chosen_id: chosen, rejected_id: rejected }).then(done)
        .catch(function (e) { setStatus(e.message, true); });
    }
    box.appendChild(button("Better", "This answer is better", function () { send(m.id, prevId, "Thanks: noted as better."); }, "better"));
    box.appendChild(button("Worse", "The previous answer was better", function () { send(prevId, m.id, "Thanks: noted as worse."); }, "worse"));
    box.appendChild(button("Same", "About the same", function () { send(null, null, ""); }, "same"));
    return box;
  }
  function copyText(text, btn) {
    var ok = function () { var o = btn.textContent; btn.textContent = "Copied"; setTimeout(function () { btn.textContent = o; }, 1200); };
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(ok, function () { fallbackCopy(text); ok(); });
    else { fallbackCopy(text); ok(); }
  }
  function fallbackCopy(text) {
    var ta = document.createElement("textarea"); ta.value = text; document.body.appendChild(ta); ta.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing else to try */ }
    ta.remove();
  }
  function rate(m, rating, div) {
    var body = { rating: rating };
    api("POST", "/api/messages/" + m.id + "/feedback", body).then(function (r) {
      m.feedback = { rating: r.rating, comment: r.comment };
      if (rating !== null && !div.querySelector(".comment-box")) {
        var cb = document.createElement("form"); cb.className = "comment-box";
        var inp = document.createElement("input"); inp.placeholder = "Optional: tell us more (Enter to send)"; cb.appendChild(inp);
        cb.onsubmit = function (ev) {
          ev.preventDefault();
          api("POST", "/api/messages/" + m.id + "/feedback", { rating: m.feedback.rating, comment: inp.value })
            .then(function (r2) { m.feedback = { rating: r2.rating, comment: r2.comment }; cb.replaceWith(note("Thanks for the feedback.")); })
            .catch(function (e) { setStatus(e.message, true); });
        };
        var old = div.querySelector(".actions"); old.replaceWith(renderMessage(m, isLastId(m.id)).querySelector(".actions"));
        div.appendChild(cb); inp.focus();
      } else {
        div.replaceWith(renderMessage(m, isLastId(m.id)));
      }
    }).catch(function (e) { setStatus(e.message, true); });
  }
  function note(t) { var s = document.createElement("div"); s.className = "meta-note"; s.textContent = t; return s; }
  function isLastId(id) { return state.path[state.path.length - 1] === id; }
  function startEdit(div, m) {
    if (state.streaming) return;
    var box = document.createElement("div"); box.className = "edit-box";
    var ta = document.createElement("textarea"); ta.value = m.content; ta.rows = Math.min(10, m.content.split("\n").length + 1);
    box.appendChild(ta);
    var btns = document.createElement("div"); btns.className = "btns";
    btns.appendChild(button("Cancel", "Cancel", function () { renderMessages(); }, "cancel"));
    btns.appendChild(button("Save & submit", "Send the edited message", function () {
      var text = ta.value.trim(); if (!text) return;
      generate({ parent_id: m.parent_id, content: text });
    }, "save"));
    box.appendChild(btns);
    div.querySelector(".bubble").replaceWith(box); ta.focus();
  }

  // ------------------------------------------------------------------ generation
  function regenerate(m) { generate({ reply_to: m.parent_id }, m.id); }
  function send() {
    var text = $("input").value.trim();
    if (!text || state.streaming) return;
    $("input").value = ""; autosize();
    generate({ parent_id: state.path.length ? state.path[state.path.length - 1] : null, content: text });
  }
  function setStreaming(on) {
    $("send").hidden = on; $("stop").hidden = !on;
  }
  function generate(body, previousAnswerId) {
    if (state.streaming) return;
    var controller = new AbortController();
    state.streaming = { controller: controller, assistantId: null };
    setStreaming(true); setStatus("");
    body.model = $("model-select").value; body.settings = readSettings();
    ensureConversation().then(function (conv) {
      return fetch("/api/conversations/" + conv.id + "/generate",
        { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    }).then(function (r) {
      if (!r.ok) return r.json().then(function (d) { throw new Error((d.error && d.error.message) || r.statusText); });
      return readEvents(r, function (ev) { onEvent(ev, previousAnswerId); });
    }).catch(function (e) {
      if (e.name === "AbortError") {
        var a = state.streaming && state.streaming.assistantId && state.byId[state.streaming.assistantId];
        if (a) { a.finish_reason = "stopped"; }
      } else { setStatus(e.message, true); }
    }).then(function () {
      state.streaming = null; setStreaming(false); renderMessages();
      return loadList();
    });
  }
  function readEvents(response, onEvent) {
    var reader = response.body.getReader(), dec = new TextDecoder(), buf = "";
    function pump() {
      return reader.read().then(function (res) {
        if (res.done) return;
        buf += dec.decode(res.value, { stream: true });
        var parts = buf.split("\n\n"); buf = parts.pop();
        parts.forEach(function (p) {
          var data = p.split("\n").filter(function (l) { return l.indexOf("data: ") === 0; })
            .map(function (l) { return l.slice(6); }).join("\n");
          if (data && data !== "[DONE]") onEvent(JSON.parse(data));
        });
        return pump();
      });
    }
    return pump();
  }
  function onEvent(ev, previousAnswerId) {
    if (ev.type === "start") {
      if (ev.user_message) state.byId[ev.user_message.id] = ev.user_message;
      state.byId[ev.assistant_message.id] = ev.assistant_message;
      state.streaming.assistantId = ev.assistant_message.id;
      if (previousAnswerId) state.compareWith[ev.assistant_message.id] = previousAnswerId;
      state.path = pathTo(ev.assistant_message.id);
      renderMessages();
      liveBubble().classList.add("cursor");
    } else if (ev.type === "delta") {
      var a = state.byId[state.streaming.assistantId];
      a.content += ev.content;
      var b = liveBubble();
      if (b) { b.innerHTML = MiniMarkdown.render(a.content); b.classList.add("cursor"); }
      var box = $("messages"); box.scrollTop = box.scrollHeight;
    } else if (ev.type === "moderation") {
      var m = state.byId[ev.message_id];
      if (m) { m.moderated = true; m.moderation = { source: ev.source, categories: ev.categories }; m.content = ev.refusal; }
      renderMessages();
    } else if (ev.type === "done") {
      state.byId[ev.message.id] = ev.message;
      if (state.conv && ev.conversation) { state.conv.title = ev.conversation.title; $("conv-title").textContent = ev.conversation.title; }
    } else if (ev.type === "error") {
      setStatus(ev.error.message, true);
    }
  }
  function liveBubble() {
    var id = state.streaming && state.streaming.assistantId;
    var el = id && document.querySelector('.msg[data-id="' + id + '"] .bubble');
    return el || null;
  }

  // ------------------------------------------------------------------ wiring
  function autosize() { var t = $("input"); t.style.height = "auto"; t.style.height = Math.min(200, t.scrollHeight) + "px"; }
  $("composer").onsubmit = function (ev) { ev.preventDefault(); send(); };
  $("input").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  $("input").addEventListener("input", autosize);
  $("stop").onclick = function () { if (state.streaming) state.streaming.controller.abort(); };
  $("new-chat").onclick = newChat;
  $("settings-toggle").onclick = function () { showSettings($("settings").hidden); };
  ["temperature", "top-p", "max-tokens", "seed", "system-prompt", "model-select"].forEach(function (id) {
    $(id).addEventListener("change", saveSettings);
  });
  $("api-key").value = localStorage.getItem(KEY_KEY) || "";
  $("api-key").addEventListener("change", function () {
    localStorage.setItem(KEY_KEY, $("api-key").value.trim());
    boot();
  });

  window.addEventListener("hashchange", function () {  // a link to another conversation of this page
    var id = location.hash.slice(1);
    if (id && (!state.conv || state.conv.id !== id)) openConversation(id);
  });

  function boot() {
    return loadConfig().then(loadList).then(function () {
      var id = location.hash.slice(1);
      if (id && state.convs.some(function (c) { return c.id === id; })) return openConversation(id);
    }).then(function () { setStatus(""); }).catch(function (e) { setStatus(e.message, true); });
  }
  boot();
})();
