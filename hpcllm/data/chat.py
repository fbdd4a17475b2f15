"""Chat-formatted prompts: a record's `messages` rendered with the tokenizer's `chat_template`.

The template is Jinja2 from a downloaded model directory, so it is untrusted code: it runs in
Jinja2's immutable sandbox, set up as transformers' `apply_chat_template` sets it up (trim_blocks,
lstrip_blocks, loop controls, the `{% generation %}` tag, `tojson` without HTML escaping,
`raise_exception`, `strftime_now`, a namespace that refuses underscore names), with the special
tokens as variables and `add_generation_prompt=True` — so the same template gives the same text,
and the same token ids, as transformers does. The sandbox refuses escapes but not work without end:
each record renders within the time and size limits of hpcllm.data.chat_limits.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from hpcllm.errors import DataError


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext

    from hpcllm.data.chat_limits import BoundedSandbox

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:  # `dict(...)` without handing the template the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.check_filters()
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=Namespace)
    return env.from_string(template)


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with a 'role' string and a 'content'")
    return messages


def render_chat(template: str, messages: list, special_tokens: dict[str, str], where: str) -> str:
    """The prompt text of a conversation, ending where the assistant's answer starts. Whatever the
    template does wrong — an error, a limit of chat_limits passed, a recursion without end, memory
    exhausted — is a DataError naming the record (`where`)."""
    import jinja2

    from hpcllm.data.chat_limits import MAX_TEMPLATE_CHARS, RenderLimit, render_bounded

    check_messages(messages, where)
    if len(template) > MAX_TEMPLATE_CHARS:
        raise DataError(f"{where}: the chat template is {len(template):,} characters, more than the "
                        f"{MAX_TEMPLATE_CHARS:,} a chat template may have")
    try:
        return render_bounded(_compile(template), dict(messages=messages, tools=None, documents=None,
                                                       add_generation_prompt=True, **special_tokens))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat_template line {e.lineno}: {e.message} (while rendering {where})") from None
    except RenderLimit as e:
        raise DataError(f"{where}: the chat template went past its limits: {e}") from None
    except RecursionError:
        raise DataError(f"{where}: the chat template recursed too deeply (a macro that calls itself without "
                        "end?)") from None
    except MemoryError:
        raise DataError(f"{where}: the chat template ran out of memory") from None
    except Exception as e:  # noqa: BLE001 - untrusted code: anything it raises is its failure on this record
        what = "" if isinstance(e, jinja2.exceptions.TemplateError) else f"{type(e).__name__}: "
        raise DataError(f"{where}: the chat template refused this conversation: {what}"
                        + " ".join(str(e).split())) from None  # one line, whatever the template's message
