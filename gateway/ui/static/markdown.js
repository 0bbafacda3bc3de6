// A small Markdown renderer that builds DOM nodes and never parses HTML.
//
// Model output is untrusted: raw HTML in it is shown as text, links keep only http(s)/mailto
// targets and open without a referrer, and images are shown as links (loading a remote image
// would let a reply leak the conversation through its URL; CSP blocks it too). Code blocks get a
// small keyword/string/comment highlighter and a copy button.
"use strict";

(function () {
  const VCG = (window.VCG = window.VCG || {});

  function node(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined) element.textContent = text;
    return element;
  }

  // -- inline ------------------------------------------------------------------------------------

  const SAFE_URL = /^(https?:\/\/|mailto:)/i;
  // One alternation, tried left to right at each position; groups are read in `inline` below.
  const INLINE = new RegExp(
    [
      /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1,2 code span
      /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3 strong
      /__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 4 strong
      /~~(?=\S)([\s\S]*?\S)~~/.source, // 5 strikethrough
      /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/.source, // 6 emphasis
      /(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/.source, // 7 emphasis
      /(!?)\[([^\]\n]*)\]\(\s*<?([^\s<>()]*)>?(?:\s+"[^"\n]*")?\s*\)/.source, // 8,9,10 link/image
      /<(https?:\/\/[^\s<>]+)>/.source, // 11 autolink
      /(https?:\/\/[^\s<>()"']*[^\s<>()"'.,;:!?*_~])/.source, // 12 bare URL
      /\\([\\`*_{}[\]()#+\-.!~|>])/.source, // 13 escape
    ].join("|"),
    "g",
  );

  function link(href, label) {
    if (!SAFE_URL.test(href)) return null;
    const a = node("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    a.textContent = label || href;
    return a;
  }

  /** Append `text` to `parent` as inline Markdown. Newlines become <br>. */
  function inline(parent, text) {
    let last = 0;
    INLINE.lastIndex = 0;
    for (let m = INLINE.exec(text); m; m = INLINE.exec(text)) {
      plain(parent, text.slice(last, m.index));
      last = INLINE.lastIndex;
      if (m[1] !== undefined) {
        parent.append(node("code", null, m[2].replace(/^ (.*) $/s, "$1")));
      } else if (m[3] !== undefined || m[4] !== undefined) {
        const strong = node("strong");
        inline(strong, m[3] !== undefined ? m[3] : m[4]);
        parent.append(strong);
      } else if (m[5] !== undefined) {
        const del = node("del");
        inline(del, m[5]);
        parent.append(del);
      } else if (m[6] !== undefined || m[7] !== undefined) {
        const em = node("em");
        inline(em, m[6] !== undefined ? m[6] : m[7]);
        parent.append(em);
      } else if (m[9] !== undefined) {
        const isImage = m[8] === "!";
        const label = isImage ? "image: " + (m[9] || m[10]) : m[9];
        const a = link(m[10], label);
        if (a) parent.append(a);
        else plain(parent, m[0]);
      } else if (m[11] !== undefined || m[12] !== undefined) {
        const url = m[11] !== undefined ? m[11] : m[12];
        const a = link(url, url);
        if (a) parent.append(a);
        else plain(parent, m[0]);
      } else if (m[13] !== undefined) {
        plain(parent, m[13]);
      }
      INLINE.lastIndex = last; // recursion above reused the regex
    }
    plain(parent, text.slice(last));
  }

  function plain(parent, text) {
    if (!text) return;
    const lines = text.split("\n");
    lines.forEach((line, i) => {
      if (i > 0) parent.append(node("br"));
      if (line) parent.append(document.createTextNode(line));
    });
  }

  // -- code highlighting -------------------------------------------------------------------------

  const KEYWORDS = new Set(
    (
      "and as assert async await break case catch class const continue def default del do elif " +
      "else enum except export extends false False finally fn for from func function go if impl " +
      "import in interface is lambda let match mod mut new nil None not null or package pass pub " +
      "raise return self select static struct super switch this throw true True try type typeof " +
      "use var void while with yield SELECT FROM WHERE INSERT INTO UPDATE DELETE CREATE TABLE " +
      "JOIN LEFT RIGHT INNER ON GROUP BY ORDER LIMIT AND OR NOT NULL AS VALUES SET echo fi then " +
      "done esac local export int float str bool string char long double unsigned"
    ).split(" "),
  );
  const HASH_COMMENT = new Set([
    "python", "py", "bash", "sh", "shell", "zsh", "ruby", "rb", "yaml", "yml", "toml", "perl",
    "r", "dockerfile", "makefile", "ini", "conf",
  ]);
  const TOKEN = /(\/\*[\s\S]*?\*\/|\/\/[^\n]*|--[^\n]*|#[^\n]*)|("""[\s\S]*?"""|'''[\s\S]*?'''|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)|(\b\d[\d_]*(?:\.\d+)?(?:e[+-]?\d+)?\b|\b0x[\da-f]+\b)|([A-Za-z_][\w]*)/gi;

  // Prose and logs have no syntax: a highlighted "if" or "and" in them would be noise.
  const PLAIN = new Set(["text", "txt", "plaintext", "plain", "log", "output", "console"]);
  // Markup is tags and attribute strings: the programming keywords above mean nothing in it.
  const MARKUP = new Set(["html", "htm", "xhtml", "xml", "svg", "markdown", "md"]);

  function highlight(code, text, lang) {
    if (PLAIN.has(lang)) {
      code.textContent = text;
      return;
    }
    const keywords = !MARKUP.has(lang);
    const hashComments = HASH_COMMENT.has(lang);
    const sqlComments = lang === "sql" || lang === "lua" || lang === "haskell";
    let last = 0;
    TOKEN.lastIndex = 0;
    for (let m = TOKEN.exec(text); m; m = TOKEN.exec(text)) {
      let kind = null;
      if (m[1] !== undefined) {
        const isHash = m[1].startsWith("#");
        const isDash = m[1].startsWith("--");
        if ((isHash && hashComments) || (isDash && sqlComments) || (!isHash && !isDash)) {
          kind = "tok-comment";
        } else {
          // Not a comment in this language: let the rest of the line be tokenized normally.
          TOKEN.lastIndex = m.index + 1;
          continue;
        }
      } else if (m[2] !== undefined) kind = "tok-string";
      else if (m[3] !== undefined) kind = "tok-number";
      else if (m[4] !== undefined && keywords && KEYWORDS.has(m[4])) kind = "tok-keyword";
      if (!kind) continue;
      if (m.index > last) code.append(document.createTextNode(text.slice(last, m.index)));
      code.append(node("span", kind, m[0]));
      last = TOKEN.lastIndex;
    }
    if (last < text.length) code.append(document.createTextNode(text.slice(last)));
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Plain-HTTP hosts on a LAN have no clipboard API: copy through a hidden text area.
    const area = node("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    try {
      document.execCommand("copy");
    } finally {
      area.remove();
    }
  }

  function copyButton(getText, label) {
    const button = node("button", "copy", "Copy");
    button.type = "button";
    button.setAttribute("aria-label", label || "Copy");
    button.addEventListener("click", async () => {
      try {
        await copyText(getText());
        button.textContent = "Copied";
      } catch (_) {
        button.textContent = "Copy failed";
      }
      setTimeout(() => {
        button.textContent = "Copy";
      }, 1500);
    });
    return button;
  }

  function codeBlock(text, rawLang) {
    const lang = (rawLang || "").toLowerCase().replace(/[^a-z0-9+#.-]/g, "").slice(0, 20);
    const wrap = node("div", "code-block");
    const head = node("div", "code-head");
    head.append(node("span", "code-lang", lang || "text"));
    head.append(copyButton(() => text, "Copy code"));
    const pre = node("pre");
    const code = node("code", lang ? "language-" + lang : null);
    highlight(code, text, lang);
    pre.append(code);
    wrap.append(head, pre);
    return wrap;
  }

  // -- blocks ------------------------------------------------------------------------------------

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line);
  }

  function cells(line) {
    let text = line.trim();
    if (text.startsWith("|")) text = text.slice(1);
    if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
    return text.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
  }

  function blocks(parent, lines) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        i += 1;
        continue;
      }
      const fence = FENCE.exec(line);
      if (fence) {
        const body = [];
        i += 1;
        // An unclosed fence (a reply still streaming) runs to the end.
        while (i < lines.length && !new RegExp("^ {0,3}" + fence[1][0] + "{" + fence[1].length + ",}\\s*$").test(lines[i])) {
          body.push(lines[i]);
          i += 1;
        }
        i += 1;
        parent.append(codeBlock(body.join("\n"), fence[2]));
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        const h = node("h" + Math.min(6, heading[1].length + 2));
        inline(h, heading[2]);
        parent.append(h);
        i += 1;
        continue;
      }
      if (RULE.test(line)) {
        parent.append(node("hr"));
        i += 1;
        continue;
      }
      if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && QUOTE.test(lines[i])) {
          inner.push(QUOTE.exec(lines[i])[1]);
          i += 1;
        }
        const quote = node("blockquote");
        blocks(quote, inner);
        parent.append(quote);
        continue;
      }
      const item = ITEM.exec(line);
      if (item) {
        i = list(parent, lines, i);
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        i = table(parent, lines, i);
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i]))) {
        para.push(lines[i]);
        i += 1;
      }
      const p = node("p");
      inline(p, para.join("\n"));
      parent.append(p);
    }
  }

  function list(parent, lines, start) {
    const first = ITEM.exec(lines[start]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const element = node(ordered ? "ol" : "ul");
    if (ordered) {
      const number = parseInt(first[2], 10);
      if (number !== 1) element.start = number;
    }
    let i = start;
    while (i < lines.length) {
      const m = ITEM.exec(lines[i]);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const body = [m[3]];
      i += 1;
      // Continuation lines and nested lists: anything indented deeper than this item.
      while (i < lines.length) {
        const next = lines[i];
        if (!next.trim()) {
          if (i + 1 < lines.length && /^\s+\S/.test(lines[i + 1]) &&
              lines[i + 1].search(/\S/) > indent) {
            body.push("");
            i += 1;
            continue;
          }
          break;
        }
        const nested = ITEM.exec(next);
        if (nested && nested[1].length <= indent) break;
        if (!nested && next.search(/\S/) <= indent && startsBlock(next)) break;
        body.push(next.slice(Math.min(next.search(/\S/), indent + 2)));
        i += 1;
      }
      const li = node("li");
      if (body.length === 1) inline(li, body[0]);
      else blocks(li, body);
      element.append(li);
      if (i < lines.length && !lines[i].trim()) {
        // A blank line between items keeps the list going.
        if (i + 1 < lines.length && ITEM.test(lines[i + 1]) &&
            ITEM.exec(lines[i + 1])[1].length === indent) {
          i += 1;
          continue;
        }
        break;
      }
    }
    parent.append(element);
    return i;
  }

  function table(parent, lines, start) {
    const wrap = node("div", "table-wrap");
    const element = node("table");
    const head = node("thead");
    const row = node("tr");
    for (const cell of cells(lines[start])) {
      const th = node("th");
      inline(th, cell);
      row.append(th);
    }
    head.append(row);
    element.append(head);
    const body = node("tbody");
    let i = start + 2;
    while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
      const tr = node("tr");
      for (const cell of cells(lines[i])) {
        const td = node("td");
        inline(td, cell);
        tr.append(td);
      }
      body.append(tr);
      i += 1;
    }
    element.append(body);
    wrap.append(element);
    parent.append(wrap);
    return i;
  }

  /** Markdown text → a DocumentFragment of safe nodes. */
  function renderMarkdown(text) {
    const fragment = document.createDocumentFragment();
    blocks(fragment, String(text || "").replace(/\r\n?/g, "\n").split("\n"));
    return fragment;
  }

  VCG.renderMarkdown = renderMarkdown;
  VCG.copyButton = copyButton;
  VCG.copyText = copyText;
})();
