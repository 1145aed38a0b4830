from stackllama.data.markdown import collapse_blank_lines, html_to_markdown


def test_code_block_keeps_language_from_pre_class_and_content():
    html = ('<p>Try:</p>\n<pre class="lang-py prettyprint-override"><code>def f(x):\n\n\n'
            '    return x &lt; 2 and x_y * 3\n</code></pre>')
    md = html_to_markdown(html)
    assert "```py\ndef f(x):\n\n\n    return x < 2 and x_y * 3\n```" in md


def test_code_block_language_from_code_class_and_none():
    assert html_to_markdown('<pre><code class="language-js">var a = 1;</code></pre>') == "```js\nvar a = 1;\n```"
    assert html_to_markdown('<pre class="lang-none"><code>plain</code></pre>') == "```\nplain\n```"
    assert html_to_markdown("<pre><code>x</code></pre>") == "```\nx\n```"


def test_links_keep_target_and_entities_are_decoded():
    md = html_to_markdown('<p>See <a href="https://example.org/a?b=1&amp;c=2">the docs</a> &amp; caf&eacute; &gt; tea</p>')
    assert md == "See [the docs](https://example.org/a?b=1&c=2) & café > tea"


def test_runs_of_blank_lines_collapse_outside_code():
    md = html_to_markdown("<p>a</p><br><br><br><p>b</p>\n\n\n\n<ul><li>x</li></ul>")
    assert "\n\n\n" not in md
    assert md.startswith("a\n\nb")
    assert collapse_blank_lines("a\n\n\n\nb\n```\n1\n\n\n2\n```\n\n\nc") == "a\n\nb\n```\n1\n\n\n2\n```\n\nc"


def test_inline_code_and_headings():
    assert html_to_markdown("<h2>Title</h2><p>use <code>a_b</code></p>") == "## Title\n\nuse `a_b`"


def test_empty_body():
    assert html_to_markdown("") == ""
    assert html_to_markdown("<p> </p>") == ""
