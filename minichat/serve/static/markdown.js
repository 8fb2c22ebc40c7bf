// A small, safe Markdown renderer for chat replies (no dependencies, no CDN).
// Safety: every piece of source text is HTML-escaped before any tag is added, and links are kept only for
// http(s) and mailto URLs, so model output can never inject markup or script into the page.
// Supported: fenced code blocks (```lang), inline code, headings, bold, italic, strikethrough, links,
// bullet and numbered lists (one level of nesting by indentation), blockquotes, horizontal rules, tables
// (pipe syntax) and paragraphs with line breaks.
(function (global) {
  "use strict";

  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function safeUrl(url) {
    // `url` is already escaped text; decode only &amp; so query strings work, and allow-list the scheme
    var raw = url.replace(/&amp;/g, "&").trim();
    if (/^(https?:\/\/|mailto:)/i.test(raw)) return escapeHtml(raw);
    return null;
  }

  // Inline markup on one escaped line. Code spans are cut out first so their content is left literal.
  function inline(text) {
    var codes = [];
    var s = text.replace(/`([^`]+)`/g, function (_, c) {
      codes.push("<code>" + c + "</code>");
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    s = s.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, function (m, label, url) {
      var u = safeUrl(url);
      return u ? '<a href="' + u + '" target="_blank" rel="noopener noreferrer">' + label + "</a>" : m;
    });
    s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>").replace(/__([^_]+)__/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^\w_])_([^_\s][^_]*)_(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/~~([^~]+)~~/g, "<del>$1</del>");
    return s.replace(/\u0000(\d+)\u0000/g, function (_, i) { return codes[+i]; });
  }

  function isTableSep(line) { return /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/.test(line); }
  function cells(line) {
    var t = line.trim().replace(/^\|/, "").replace(/\|$/, "");
    return t.split("|").map(function (c) { return inline(c.trim()); });
  }

  function render(src) {
    var lines = escapeHtml(String(src || "")).replace(/\r\n?/g, "\n").split("\n");
    var out = [], para = [], i = 0;
    function flush() {
      if (para.length) { out.push("<p>" + para.map(inline).join("<br>") + "</p>"); para = []; }
    }
    while (i < lines.length) {
      var line = lines[i], m;
      if ((m = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/))) {
        flush();
        var fence = m[1], lang = m[2], body = [];
        i++;
        while (i < lines.length && lines[i].trim().indexOf(fence) !== 0) { body.push(lines[i]); i++; }
        i++; // closing fence (an unclosed block runs to the end, as when a reply is still streaming)
        out.push('<div class="code"><div class="code-head"><span>' + (lang || "code") +
          '</span><button class="copy-code" type="button">Copy</button></div><pre><code' +
          (lang ? ' class="language-' + lang + '"' : "") + ">" + body.join("\n") + "</code></pre></div>");
        continue;
      }
      if (/^\s*$/.test(line)) { flush(); i++; continue; }
      if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
        flush(); out.push("<h" + m[1].length + ">" + inline(m[2]) + "</h" + m[1].length + ">"); i++; continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { flush(); out.push("<hr>"); i++; continue; }
      if (/^&gt;\s?/.test(line)) {
        flush();
        var q = [];
        while (i < lines.length && /^&gt;\s?/.test(lines[i])) { q.push(lines[i].replace(/^&gt;\s?/, "")); i++; }
        out.push("<blockquote>" + render_escaped(q) + "</blockquote>");
        continue;
      }
      if (line.indexOf("|") >= 0 && i + 1 < lines.length && isTableSep(lines[i + 1])) {
        flush();
        var head = cells(line), rows = [];
        i += 2;
        while (i < lines.length && lines[i].indexOf("|") >= 0 && !/^\s*$/.test(lines[i])) { rows.push(cells(lines[i])); i++; }
        out.push("<table><thead><tr>" + head.map(function (c) { return "<th>" + c + "</th>"; }).join("") +
          "</tr></thead><tbody>" + rows.map(function (r) {
            return "<tr>" + r.map(function (c) { return "<td>" + c + "</td>"; }).join("") + "</tr>";
          }).join("") + "</tbody></table>");
        continue;
      }
      if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
        flush();
        var res = list(lines, i, indentOf(line));
        out.push(res.html); i = res.next; continue;
      }
      para.push(line); i++;
    }
    flush();
    return out.join("\n");
  }

  function indentOf(line) { return line.match(/^\s*/)[0].length; }

  function list(lines, i, indent) {
    var ordered = /^\s*\d+[.)]\s+/.test(lines[i]);
    var start = ordered ? parseInt(lines[i].trim(), 10) : 1;
    var items = [], m;
    while (i < lines.length) {
      var line = lines[i];
      if (/^\s*$/.test(line)) {
        // a blank line ends the list unless the next line continues it
        if (i + 1 < lines.length && /^\s*([-*+]|\d+[.)])\s+/.test(lines[i + 1]) && indentOf(lines[i + 1]) >= indent) { i++; continue; }
        break;
      }
      var ind = indentOf(line);
      if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/)) && ind === indent) {
        if (/\d/.test(m[1]) !== ordered) break; // a list of the other kind starts here
        items.push(inline(m[2])); i++; continue;
      }
      if (m && ind > indent && items.length) {
        var sub = list(lines, i, ind);
        items[items.length - 1] += sub.html; i = sub.next; continue;
      }
      if (!m && ind > indent && items.length) { items[items.length - 1] += "<br>" + inline(line.trim()); i++; continue; }
      break;
    }
    var tag = ordered ? "ol" : "ul";
    var open = ordered && start !== 1 ? "<ol start=\"" + start + "\">" : "<" + tag + ">";
    return { html: open + items.map(function (x) { return "<li>" + x + "</li>"; }).join("") + "</" + tag + ">", next: i };
  }

  // Blockquote bodies are already escaped: render them without escaping twice.
  function render_escaped(escapedLines) {
    var unescaped = escapedLines.join("\n").replace(/&lt;/g, "<").replace(/&gt;/g, ">")
      .replace(/&quot;/g, '"').replace(/&#39;/g, "'").replace(/&amp;/g, "&");
    return render(unescaped);
  }

  global.MiniMarkdown = { render: render, escapeHtml: escapeHtml };
})(typeof window !== "undefined" ? window : globalThis);
