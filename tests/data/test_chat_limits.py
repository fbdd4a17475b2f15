"""A chat template is untrusted code: whatever it does, each record renders within the limits of
hpcllm.data.chat_limits (time, size, numbers, recursion) or stops with one DataError naming the record —
never a hang, a traceback or memory exhausted — and real templates render as before."""

import json
import time

import pytest

from hpcllm.data.chat import render_chat
from hpcllm.data.chat_limits import RENDER_SECONDS
from hpcllm.errors import DataError
from tests.infer.helpers import prepare_prompts

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MPI?"}]

HOSTILE = {
    "huge power": "{{ 10 ** 1000000000 }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a string": "{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "string product": "{{ 'a' * 10000000000 }}",
    "list product": "{{ ['abc'] * 10000000000 }}",
    "product far past memory": "{{ 'a' * 100000000000000 }}",
    "range past the sandbox's": "{{ range(10**9)|list }}",
    "recursive macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "doubling with ~": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s=['ab']) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "squaring": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "nested literals": "{% set a = ['x' * 100000] %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
                       "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}"
                       "{% set e = [d, d, d, d, d, d, d, d, d, d] %}{{ e }}",
    "a macro's buffered output": "{% macro m() %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}"
                                 "{% endmacro %}{{ m()|length }}",
    "a set block": "{% set big = 'z' * 500000 %}{% set x %}{% for i in range(100000) %}{{ big }}{% endfor %}"
                   "{% endset %}{{ x|length }}",
    "output": "{% for i in range(100000) %}{{ 'w' * 1000 }}{% endfor %}",
    "width filter": "{{ 'x'|center(10**9) }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "printf width": "{{ '%999999999d' % 1 }}",
    "join separator": "{{ range(100000)|join('s' * 100000) }}",
    "replace": "{% set s = 'a' * 100000 %}{{ s.replace('a', s)|length }}",
    "indent": "{% set s = '\n' * 100000 %}{{ s|indent(100000)|length }}",
    "a call far past memory": "{{ ('a' * 1000000).center(10**12) }}",
}


@pytest.mark.parametrize("template", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_templates_stop_with_one_error_naming_the_record(template):
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"^prompts\.jsonl:3: the chat template") as e:
        render_chat(template, CHAT, {}, "prompts.jsonl:3")
    assert time.monotonic() - t0 < RENDER_SECONDS + 1.5, e.value
    assert "\n" not in str(e.value)


def test_limits_leave_real_templates_alone():
    """Loops, macros, namespaces, filters, format and `~` as chat templates use them; the long
    conversation is far past the fixed output allowance (the limits grow with the conversation)."""
    template = ("{%- macro render(m) %}{{ '<|' ~ m.role ~ '|>\\n' }}{{ m.content | trim }}{{ '<|end|>\\n' }}"
                "{%- endmacro %}{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- set ns.n = ns.n + 1 %}"
                "{{- render(m) }}{%- endfor %}{{ '{} messages, {}'.format(ns.n, [1, 2]|tojson) }}"
                "{{ messages|map(attribute='role')|join(',') }}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    long = [{"role": "user", "content": "x" * 3_000_000}, {"role": "assistant", "content": "ok"}]
    out = render_chat(template, long, {}, "r:1")
    assert out == (f"<|user|>\n{'x' * 3_000_000}<|end|>\n<|assistant|>\nok<|end|>\n"
                   "2 messages, [1, 2]user,assistant<|assistant|>")


def test_prepare_names_the_record_and_exits_5(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "plain": 1, "</s>": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": HOSTILE["huge power"]}))
    t0 = time.monotonic()
    p = prepare_prompts(tmp_path, [{"id": 0, "prompt": "plain"}, {"id": 1, "messages": CHAT}], tokenizer=str(d))
    # the power was folded as a constant when the template compiled: prepare hung before rendering
    assert p.returncode == 5 and "prompts.jsonl:2: the chat template went past its limits: 10 ** 1000000000 has " \
        "more than 65,536 bits" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert time.monotonic() - t0 < 30
