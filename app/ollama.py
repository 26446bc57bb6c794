"""An Ollama Modelfile beside an exported GGUF, with the chat template translated to Ollama's syntax.

Ollama does not run the Jinja chat template stored in the GGUF: it renders prompts with its own Go
text/template. Without a TEMPLATE line it guesses one, which may not be the layout the model was trained
with. So the chat template's family is recognised (`chat_family`) and its Go template comes from Unsloth's
library (unsloth/ollama_template_mappers.py, Ollama's legacy `.System`/`.Prompt`/`.Response` form) where
that renders what the Jinja original renders, else from here (the `.Messages` form of Ollama's own library).
tests/test_ollama.py renders every family's TEMPLATE as Ollama does, next to its Jinja original, and asserts
the same text; it also says why each family written here is not Unsloth's. Two things differ on purpose: no
BOS (llama.cpp adds it when it tokenizes), and a conversation that ends with an assistant message is
continued (Ollama's prefill: no end-of-turn after it, no new assistant prompt).
"""
import re
from pathlib import Path

from app import AppError
from app.runs import write_text
from app.tiny import CHAT_TEMPLATE as TINY_CHAT_TEMPLATE

# `eos_token` is written literally where a Jinja template uses it (tiny, Mistral): `</s>` in both vocabularies.
TINY = """\
{{- if .System }}<|system|>
{{ .System }}
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|user|>
{{ .Content }}
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}{{ if not $last }}</s>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

LLAMA3_TURNS = """
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

# Llama 3.1 always writes a system turn, dated with the template's default date_string (what transformers
# renders when no date is passed, so what training saw).
LLAMA31 = """\
<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: {date}

{{ .System }}<|eot_id|>""" + LLAMA3_TURNS

CHATML = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{default}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

# Mistral v0.3 puts the system prompt into the last user turn and has no assistant prompt: `[/INST]` is it.
MISTRAL = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if and $.System $last }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}</s>{{ end }}
{{- end }}
{{- end }}"""

# Mistral v0.3's layout, told apart from v0.1/v0.2 and Nemo by its spacing: "[INST] " and " " + reply.
MISTRAL_V3 = (r"""\[INST\] ["']\s*\+\s*system_message""",
              r"""["'] ["']\s*\+\s*message\[["']content["']\]\s*\|\s*trim\s*\+\s*eos_token""")
# ChatML variants whose layout plain ChatML does not give: thinking blocks (Qwen3, SmolLM3's dated metadata
# system turn and /think switches, which Go templates cannot test for) and Phi-4's <|im_sep|>.
CHATML_OTHERS = ("<think>", "Reasoning Mode", "<|im_sep|>")


# family -> the name of its template in Unsloth's OLLAMA_TEMPLATES, for the families where it renders what
# the Jinja original renders (tests/test_ollama.py); the others are written above
FROM_UNSLOTH = {"llama-3": "llama-3", "chatml": "chatml", "gemma": "gemma2", "phi-3": "phi-3"}
QWEN_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<]+)<\|im_end\|>")


def chat_family(chat_template: str) -> str | None:
    """The layout family of a Jinja chat template, from the markers it writes; None for an unknown one, or
    one whose layout no Go template here renders (thinking blocks, other Mistral spacings)."""
    t = chat_template
    if t == TINY_CHAT_TEMPLATE:  # our own, recognised exactly: its markers look like Zephyr's and Phi's
        return "tiny"
    if "<|start_header_id|>" in t:
        return "llama-3.1" if "Cutting Knowledge Date" in t else "llama-3"
    if "<|im_start|>" in t and "<|im_end|>" in t:
        if any(marker in t for marker in CHATML_OTHERS):
            return None
        return "qwen" if QWEN_DEFAULT_SYSTEM.search(t) else "chatml"  # Qwen writes a default system turn
    if "[INST]" in t:
        return "mistral-v0.3" if all(re.search(p, t) for p in MISTRAL_V3) else None
    if "<start_of_turn>" in t:
        return "gemma"
    if "<|user|>" in t and "<|end|>" in t:
        return "phi-3"
    return None


def unsloth_template(name: str) -> str:
    """The TEMPLATE of Unsloth's Modelfile for `name` (its sampling PARAMETERs are not taken)."""
    from unsloth.ollama_template_mappers import OLLAMA_TEMPLATES
    return re.search(r'TEMPLATE """(.*?)"""', OLLAMA_TEMPLATES[name], re.S)[1]


def modelfile_template(chat_template: str) -> str | None:
    """The Go template for Ollama that renders what the Jinja `chat_template` renders; None for an unknown family."""
    family = chat_family(chat_template)
    if family in FROM_UNSLOTH:
        return unsloth_template(FROM_UNSLOTH[family])
    if family == "tiny":
        return TINY
    if family == "llama-3.1":
        date = re.search(r"""date_string = ["']([^"']+)["']""", chat_template)
        return LLAMA31.replace("{date}", date[1] if date else "26 Jul 2024")
    if family == "qwen":
        default = QWEN_DEFAULT_SYSTEM.search(chat_template)[1]
        return CHATML.replace("{default}", "{{ else }}<|im_start|>system\n" + default + "<|im_end|>\n")
    if family == "mistral-v0.3":
        return MISTRAL
    return None


def write_modelfile(gguf: Path, chat_template: str, stop_tokens: list[str], system: str | None = None) -> Path:
    """gguf.parent / "Modelfile" for `ollama create`: FROM the GGUF, its TEMPLATE, stop tokens, SYSTEM.

    One Modelfile per folder: it names one GGUF. An unknown template family still gives a Modelfile, without
    TEMPLATE (Ollama then uses its default), with a comment saying so."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise AppError(f"cannot write an Ollama Modelfile for {gguf}: no such GGUF file")
    if system and '"""' in system:
        raise AppError('the system prompt contains """, which cannot be quoted in an Ollama Modelfile')
    stops = list(dict.fromkeys(t for t in stop_tokens if t))  # once each, in order
    bad = [t for t in stops if '"' in t or "\n" in t]
    if bad:
        raise AppError(f"stop token {bad[0]!r} cannot be written in an Ollama Modelfile (quote or newline)")

    lines = [f"# Ollama Modelfile for {gguf.name}. From this folder:",
             "#   ollama create NAME -f Modelfile",
             "#   ollama run NAME",
             "", f"FROM ./{gguf.name}"]
    template = modelfile_template(chat_template)
    if template is None:
        lines += ["# The chat template could not be translated to Ollama's template syntax (unknown family),",
                  "# so there is no TEMPLATE: Ollama uses its default for this model."]
    else:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')

    out = gguf.parent / "Modelfile"
    write_text(out, "\n".join(lines) + "\n")
    return out
