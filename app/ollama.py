"""An Ollama Modelfile beside an exported GGUF, with the chat template translated to Ollama's syntax.

Ollama does not run the Jinja chat template stored in the GGUF: it renders prompts with its own Go
text/template over `.System` and `.Messages` (system messages are in both). Without a TEMPLATE line it
guesses one, which may not be the layout the model was trained with. So each supported family has a
hand-written Go template here, in the `.Messages` form of Ollama's own library templates, and
tests/test_ollama.py renders it next to the Jinja original and asserts the same text. Two things differ on
purpose: no BOS (llama.cpp adds it when it tokenizes), and a conversation that ends with an assistant message
is continued (Ollama's prefill: no end-of-turn after it, no new assistant prompt).
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

LLAMA3 = """\
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}""" + LLAMA3_TURNS

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

# Gemma has no system role (Gemma 2's own template raises on one); like Unsloth's Gemma templates, the system
# text opens the first user turn, which follows the system message (index 1).
GEMMA = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $.System (eq $i 1) }}{{ $.System }} {{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}"""

PHI3 = """\
{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|user|>
{{ .Content }}<|end|>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}{{ if not $last }}<|end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

# Mistral v0.3's layout, told apart from v0.1/v0.2 and Nemo by its spacing: "[INST] " and " " + reply.
MISTRAL_V3 = (r"""\[INST\] ["']\s*\+\s*system_message""",
              r"""["'] ["']\s*\+\s*message\[["']content["']\]\s*\|\s*trim\s*\+\s*eos_token""")
# ChatML variants whose layout plain ChatML does not give: thinking blocks (Qwen3, SmolLM3's dated metadata
# system turn and /think switches, which Go templates cannot test for) and Phi-4's <|im_sep|>.
CHATML_OTHERS = ("<think>", "Reasoning Mode", "<|im_sep|>")


def modelfile_template(chat_template: str) -> str | None:
    """The Go template for Ollama that renders what the Jinja `chat_template` renders; None for an unknown family."""
    t = chat_template
    if t == TINY_CHAT_TEMPLATE:  # our own, recognised exactly: its markers look like Zephyr's and Phi's
        return TINY
    if "<|start_header_id|>" in t:
        if "Cutting Knowledge Date" not in t:
            return LLAMA3
        date = re.search(r"""date_string = ["']([^"']+)["']""", t)
        return LLAMA31.replace("{date}", date[1] if date else "26 Jul 2024")
    if "<|im_start|>" in t and "<|im_end|>" in t:
        if any(marker in t for marker in CHATML_OTHERS):
            return None
        # Qwen's templates write a default system turn when the conversation has none
        default = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<]+)<\|im_end\|>", t)
        otherwise = "{{ else }}<|im_start|>system\n" + default[1] + "<|im_end|>\n" if default else ""
        return CHATML.replace("{default}", otherwise)
    if "[INST]" in t:
        return MISTRAL if all(re.search(p, t) for p in MISTRAL_V3) else None
    if "<start_of_turn>" in t:
        return GEMMA
    if "<|user|>" in t and "<|end|>" in t:
        return PHI3
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
