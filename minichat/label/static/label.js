// The labeling page: log in, take the next task of a kind, do it by keyboard, and have every step saved.
// Unfinished work goes to the server as a draft as it is done (typing, each ranking key), so a reload brings
// it back; submitted work is listed under "My recent work" and can be reopened and changed.
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var esc = window.MiniMarkdown.escapeHtml;
  var S = { token: localStorage.getItem("label.token"), me: null, projects: [], flags: [],
            project: localStorage.getItem("label.project"), kind: localStorage.getItem("label.kind") || "demonstration",
            a: null, groups: [], tie: false, none: false, rates: {}, cur: 0, draftTimer: null };

  function api(method, path, body) {
    var opts = { method: method, headers: {} };
    if (S.token) opts.headers["Authorization"] = "Bearer " + S.token;
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    return fetch("/label/api" + path, opts).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (r.status === 401 && path !== "/login") { logout(); }
        if (!r.ok) throw new Error((j.error && j.error.message) || ("HTTP " + r.status));
        return j;
      });
    });
  }
  function showError(e) { $("error").textContent = e ? (e.message || String(e)) : ""; }
  function status(t) { $("save-status").textContent = t; }

  // ------------------------------------------------------------------ login
  function logout() {
    if (S.token) fetch("/label/api/logout", { method: "POST", headers: { Authorization: "Bearer " + S.token } });
    S.token = null; localStorage.removeItem("label.token");
    $("nav").hidden = $("work").hidden = $("dashboard").hidden = true; $("login").hidden = false;
  }
  $("login-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    $("login-error").textContent = "";
    api("POST", "/login", { name: $("login-name").value.trim(), secret: $("login-secret").value })
      .then(function (j) { S.token = j.token; localStorage.setItem("label.token", j.token); start(); })
      .catch(function (e) { $("login-error").textContent = e.message; });
  });
  $("logout").addEventListener("click", logout);

  function start() {
    api("GET", "/me").then(function (j) {
      S.me = j.user; S.projects = j.projects; S.flags = j.flags;
      $("login").hidden = true; $("nav").hidden = false; $("work").hidden = false;
      $("who").textContent = j.user.name + (j.user.role === "admin" ? " (admin)" : "");
      var sel = $("project-select");
      sel.innerHTML = S.projects.map(function (p) { return "<option>" + esc(p.name) + "</option>"; }).join("");
      if (!S.projects.some(function (p) { return p.name === S.project; })) S.project = S.projects.length ? S.projects[0].name : null;
      sel.value = S.project || "";
      chooseKind(S.kind);
    }).catch(function () { logout(); });
  }
  $("project-select").addEventListener("change", function () {
    S.project = this.value; localStorage.setItem("label.project", S.project); chooseKind(S.kind);
  });
  document.querySelectorAll(".kind").forEach(function (b) {
    b.addEventListener("click", function () { chooseKind(b.dataset.kind); });
  });

  function project() { return S.projects.filter(function (p) { return p.name === S.project; })[0]; }

  function chooseKind(kind) {
    S.kind = kind; localStorage.setItem("label.kind", kind);
    document.querySelectorAll(".kind").forEach(function (b) { b.classList.toggle("active", b.dataset.kind === kind); });
    var p = project();
    $("guidelines").innerHTML = p ? window.MiniMarkdown.render(p.guidelines || "*No guidelines.*") : "";
    $("dashboard").hidden = true; $("work").hidden = false;
    loadNext();
    loadHistory();
  }

  // ------------------------------------------------------------------ tasks
  function loadNext() {
    showError(null); status("");
    if (!S.project) { show(null); return; }
    api("POST", "/projects/" + encodeURIComponent(S.project) + "/next", { kind: S.kind })
      .then(function (j) { show(j.assignment); }).catch(showError);
  }

  function show(a) {
    S.a = a;
    ["demo-pane", "rank-pane", "rate-pane"].forEach(function (id) { $(id).hidden = true; });
    $("empty").hidden = !!a;
    $("conversation").innerHTML = ""; $("task-title").textContent = ""; $("category").textContent = "";
    if (!a) return;
    $("task-title").textContent = { demonstration: "Write the assistant's reply", ranking: "Rank the answers, best first",
                                    rating: "Rate each answer" }[a.kind] + (a.status === "done" ? " (submitted; you may change it)" : "")
                                    + (a.labeler !== S.me.name ? " — " + a.labeler : "");
    $("category").textContent = a.category || "";
    $("conversation").innerHTML = a.messages.map(function (m) {
      return '<div class="turn ' + esc(m.role) + '"><span class="role">' + esc(m.role) + "</span>" + esc(m.content) + "</div>";
    }).join("");
    var d = a.draft || {}, r = a.record || {};
    if (a.kind === "demonstration") {
      $("demo-pane").hidden = false;
      $("demo-text").value = d.content !== undefined ? d.content : (r.content || "");
      $("demo-text").focus();
    } else if (a.kind === "ranking") {
      $("rank-pane").hidden = false;
      S.groups = d.groups || r.ranking || []; S.none = !!(d.none_acceptable !== undefined ? d.none_acceptable : r.none_acceptable);
      S.tie = false;
      renderRanking();
      if (document.activeElement) document.activeElement.blur();
    } else {
      $("rate-pane").hidden = false;
      S.rates = {}; S.cur = 0;
      (r.ratings || []).forEach(function (x) { S.rates[x.answer_id] = { likert: x.likert, flags: x.flags }; });
      if (d.rates) S.rates = d.rates;
      renderRating();
      if (document.activeElement) document.activeElement.blur();
    }
  }

  function saveDraft(draft, now) {
    if (!S.a) return;
    var id = S.a.id;
    clearTimeout(S.draftTimer);
    var go = function () {
      status("Saving…");
      S.pending = (S.pending || 0) + 1;
      // one save at a time, in order, so an older draft can never overwrite a newer one on the server
      S.chain = (S.chain || Promise.resolve()).then(function () {
        return api("PUT", "/assignments/" + id + "/draft", { draft: draft });
      }).then(function () { S.pending--; if (S.a && S.a.id === id && !S.pending) status("Saved"); })
        .catch(function (e) { S.pending--; showError(e); });
    };
    if (now) go(); else S.draftTimer = setTimeout(go, 300);
  }

  function submitted(a) {
    clearTimeout(S.draftTimer);
    status("Submitted");
    loadHistory();
    loadNext();
    setTimeout(function () { status("Submitted"); }, 0);
  }

  function submit(path, body) {
    showError(null);
    clearTimeout(S.draftTimer);
    var id = S.a.id;
    // after any draft still on its way, so the submit is the last word
    return (S.chain || Promise.resolve()).then(function () {
      return api("POST", "/assignments/" + id + "/" + path, body);
    }).then(submitted).catch(showError);
  }

  // demonstration
  $("demo-text").addEventListener("input", function () { saveDraft({ content: this.value }); });
  $("demo-submit").addEventListener("click", function () { submit("demonstration", { content: $("demo-text").value }); });
  $("demo-text").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("demo-submit").click(); }
    if (ev.key === "Escape") this.blur();
  });

  // ranking
  function placed() { return [].concat.apply([], S.groups); }
  function renderRanking() {
    var a = S.a, place = {};
    S.groups.forEach(function (g, i) { g.forEach(function (id) { place[id] = i + 1; }); });
    var num = {};
    a.answers.forEach(function (x, i) { num[x.id] = i + 1; });
    $("rank-answers").innerHTML = a.answers.map(function (x, i) {
      return '<div class="answer" data-id="' + x.id + '"><span class="num">' + (i + 1) + '</span><span class="rank-badge">' +
        (place[x.id] ? "#" + place[x.id] : "") + '</span><div class="content">' + esc(x.content) + "</div></div>";
    }).join("");
    $("ranking-line").textContent = S.groups.length ? S.groups.map(function (g) {
      return g.map(function (id) { return num[id]; }).join(" = ");
    }).join("  >  ") + (S.tie ? "  = …" : "") : "Best first: press the numbers.";
    $("none-acceptable").checked = S.none;
    document.querySelectorAll("#rank-answers .answer").forEach(function (el) {
      el.addEventListener("click", function () { placeAnswer(Number(el.dataset.id)); });
    });
  }
  function rankingChanged() { renderRanking(); saveDraft({ groups: S.groups, none_acceptable: S.none }, true); }
  function placeAnswer(id) {
    if (placed().indexOf(id) >= 0) return;
    if (S.tie && S.groups.length) S.groups[S.groups.length - 1].push(id); else S.groups.push([id]);
    S.tie = false;
    rankingChanged();
  }
  function undoRank() {
    if (!S.groups.length) return;
    var g = S.groups[S.groups.length - 1];
    g.pop();
    if (!g.length) S.groups.pop();
    rankingChanged();
  }
  $("none-acceptable").addEventListener("change", function () { S.none = this.checked; rankingChanged(); });
  $("rank-clear").addEventListener("click", function () { S.groups = []; S.tie = false; rankingChanged(); });
  $("rank-submit").addEventListener("click", function () {
    submit("ranking", { ranking: S.groups.length ? S.groups : null, none_acceptable: S.none });
  });

  // rating
  function renderRating() {
    var a = S.a;
    $("rate-answers").innerHTML = a.answers.map(function (x, i) {
      var r = S.rates[x.id] || { flags: {} };
      var lk = [1, 2, 3, 4, 5, 6, 7].map(function (v) {
        return '<button class="lk' + (r.likert === v ? " on" : "") + '" data-v="' + v + '">' + v + "</button>";
      }).join("");
      var flags = S.flags.map(function (f) {
        return '<label><input type="checkbox" data-flag="' + f + '"' + (r.flags && r.flags[f] ? " checked" : "") + "> " +
          esc(f.replace(/_/g, " ")) + "</label>";
      }).join("");
      return '<div class="answer' + (i === S.cur ? " current" : "") + '" data-id="' + x.id + '"><span class="num">' + (i + 1) +
        '</span><div class="content">' + esc(x.content) + '</div><div class="likert">' + lk + '</div><div class="flags">' + flags + "</div></div>";
    }).join("");
    document.querySelectorAll("#rate-answers .answer").forEach(function (el, i) {
      var id = Number(el.dataset.id);
      el.querySelectorAll(".lk").forEach(function (b) {
        b.addEventListener("click", function () { setLikert(i, Number(b.dataset.v)); });
      });
      el.querySelectorAll("input[data-flag]").forEach(function (c) {
        c.addEventListener("change", function () {
          var r = S.rates[id] = S.rates[id] || { flags: {} };
          r.flags = r.flags || {}; r.flags[c.dataset.flag] = c.checked;
          saveDraft({ rates: S.rates }, true);
        });
      });
    });
  }
  function setLikert(i, v) {
    var id = S.a.answers[i].id;
    var r = S.rates[id] = S.rates[id] || { flags: {} };
    r.likert = v;
    S.cur = Math.min(i + 1, S.a.answers.length - 1);
    renderRating();
    saveDraft({ rates: S.rates }, true);
  }
  $("rate-submit").addEventListener("click", function () {
    submit("rating", { ratings: S.a.answers.map(function (x) {
      var r = S.rates[x.id] || {};
      return { answer_id: x.id, likert: r.likert === undefined ? null : r.likert, flags: r.flags || {} };
    }) });
  });

  document.querySelectorAll(".skip").forEach(function (b) {
    b.addEventListener("click", function () { if (S.a) submit("skip", {}); });
  });

  // ------------------------------------------------------------------ keyboard
  document.addEventListener("keydown", function (ev) {
    if (!S.me) return;
    if (ev.altKey && !ev.ctrlKey) {
      var k = { "1": "demonstration", "2": "ranking", "3": "rating" }[ev.key];
      if (k) { ev.preventDefault(); chooseKind(k); return; }
      if (ev.key === "d" || ev.key === "D") { ev.preventDefault(); toggleDashboard(); return; }
    }
    var t = ev.target;
    if (t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "checkbox") || t.tagName === "SELECT")) return;
    if (!S.a || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var n = Number(ev.key);
    if (S.a.kind === "ranking") {
      if (n >= 1 && n <= S.a.answers.length) { ev.preventDefault(); placeAnswer(S.a.answers[n - 1].id); }
      else if (ev.key === "=") { ev.preventDefault(); if (S.groups.length) { S.tie = true; renderRanking(); } }
      else if (ev.key === "Backspace") { ev.preventDefault(); undoRank(); }
      else if (ev.key === "x") { ev.preventDefault(); S.none = !S.none; rankingChanged(); }
      else if (ev.key === "s") { ev.preventDefault(); submit("skip", {}); }
      else if (ev.key === "Enter") { ev.preventDefault(); $("rank-submit").click(); }
    } else if (S.a.kind === "rating") {
      if (n >= 1 && n <= 7) { ev.preventDefault(); setLikert(S.cur, n); }
      else if (ev.key === "j") { S.cur = Math.min(S.cur + 1, S.a.answers.length - 1); renderRating(); }
      else if (ev.key === "k") { S.cur = Math.max(S.cur - 1, 0); renderRating(); }
      else if (ev.key === "s") { ev.preventDefault(); submit("skip", {}); }
      else if (ev.key === "Enter") { ev.preventDefault(); $("rate-submit").click(); }
    } else if (S.a.kind === "demonstration") {
      if (ev.key === "Enter" || ev.key === "i") { ev.preventDefault(); $("demo-text").focus(); }
    }
  });

  // ------------------------------------------------------------------ history and dashboard
  function loadHistory() {
    if (!S.project) { $("history").innerHTML = ""; return; }
    api("GET", "/assignments?limit=30&project=" + encodeURIComponent(S.project) + "&user_name=" + encodeURIComponent(S.me.name))
      .then(function (j) {
        $("history").innerHTML = j.data.map(function (a) {
          var last = a.messages[a.messages.length - 1].content;
          var what = a.record && a.record.content ? ": " + a.record.content : "";
          return '<li data-id="' + a.id + '" class="hist ' + a.kind + " " + a.status + '"><span class="st">' + esc(a.status) + "</span>" +
            esc(a.kind) + " · " + esc(last.slice(0, 60)) + esc(what.slice(0, 80)) + "</li>";
        }).join("");
        document.querySelectorAll("#history li").forEach(function (li) {
          li.addEventListener("click", function () {
            api("GET", "/assignments/" + li.dataset.id).then(function (a) {
              if (a.kind !== S.kind) { S.kind = a.kind; document.querySelectorAll(".kind").forEach(function (b) {
                b.classList.toggle("active", b.dataset.kind === a.kind); }); }
              show(a);
            }).catch(showError);
          });
        });
      }).catch(showError);
  }

  function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }
  function toggleDashboard() {
    var open = $("dashboard").hidden;
    $("dashboard").hidden = !open; $("work").hidden = open;
    if (!open) return;
    api("GET", "/dashboard").then(function (d) {
      var h = "<table><tr><th>project</th><th>prompts</th><th>tasks</th><th>done</th><th>complete</th><th>comparisons</th></tr>" +
        d.projects.map(function (p) {
          return "<tr><td>" + esc(p.name) + "</td><td>" + p.prompts + "</td><td>" + esc(JSON.stringify(p.tasks)) + "</td><td>" +
            (p.assignments.done || 0) + "</td><td>" + p.tasks_complete + " (" + pct(p.progress) + ")</td><td>" + p.comparisons + "</td></tr>";
        }).join("") + "</table>";
      h += "<table><tr><th>labeler</th><th>done</th><th>skipped</th><th>agreement</th><th>held out</th></tr>" +
        d.labelers.map(function (r) {
          var ho = S.me.role === "admin" ? '<input type="checkbox" class="held-out" data-name="' + esc(r.labeler) + '"' +
            (r.held_out ? " checked" : "") + ">" : (r.held_out ? "yes" : "no");
          return "<tr><td>" + esc(r.labeler) + "</td><td>" + esc(JSON.stringify(r.done)) + "</td><td>" + r.skipped + "</td><td>" +
            pct(r.agreement) + "</td><td>" + ho + "</td></tr>";
        }).join("") + "</table>";
      h += "<p>Inter-labeler agreement on comparisons: <b id='agreement'>" + pct(d.agreement.agreement) + "</b> over " +
        d.agreement.pairs + " answer pairs.</p>";
      var ra = d.agreement.ratings;
      if (ra && ra.pairs) {
        h += "<p id='rating-agreement'>Likert ratings of the same answer: " + pct(ra.exact) + " equal, " + pct(ra.within_one) +
          " within one point, mean difference " + ra.mean_abs_diff.toFixed(2) + ", Krippendorff's alpha " +
          (ra.alpha === null ? "—" : ra.alpha.toFixed(2)) + " (" + ra.pairs + " pairs of ratings).</p>";
      }
      var fl = d.agreement.flags || {};
      var names = Object.keys(fl).sort();
      if (names.length) {
        h += "<p id='flag-agreement'>Metadata flags, agreement (alpha): " + names.map(function (f) {
          return esc(f.replace(/_/g, " ")) + " " + pct(fl[f].exact) + " (" + (fl[f].alpha === null ? "—" : fl[f].alpha.toFixed(2)) + ")";
        }).join(", ") + ".</p>";
      }
      $("dash-body").innerHTML = h;
      document.querySelectorAll(".held-out").forEach(function (c) {
        c.addEventListener("change", function () {
          api("PATCH", "/users/" + encodeURIComponent(c.dataset.name), { held_out: c.checked }).catch(showError);
        });
      });
    }).catch(showError);
  }
  $("dashboard-toggle").addEventListener("click", toggleDashboard);

  if (S.token) start(); else logout();
})();
