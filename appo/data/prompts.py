"""Chat prompts for video QA: the Video-R1 think/answer format, shared by SFT, RL and eval."""

from __future__ import annotations

from typing import Any

from appo.data.schema import VideoQA

SYSTEM_PROMPT = (
    "Watch the video, think about the question, then answer. "
    "Put your reasoning in <think> </think> and the final answer in <answer> </answer>."
)

TYPE_INSTRUCTIONS = {
    "multiple choice": "Answer with the option's letter.",
    "numerical": "Answer with a number.",
    "regression": "Answer with a number.",
    "free-form": "Answer with a short phrase.",
    "OCR": "Answer with the text you read.",
}


def question_text(qa: VideoQA) -> str:
    """Question, its lettered options and the answer-format instruction, one per line."""
    lines = [qa.problem]
    if qa.options:
        lines.append("Options: " + " ".join(qa.options))
    lines.append(TYPE_INSTRUCTIONS[qa.problem_type])
    # Grounding is asked for whenever the record has gold spans (NExT-GQA's time_clues), not by
    # dataset name: APPO's own NExT-GQA file calls itself "nextqa", and without the
    # instruction the spans are never produced, so mIoU would be ~0 by construction.
    if qa.time_spans:
        duration = f"The video lasts {qa.duration:.1f} seconds. " if qa.duration else ""
        lines.append(f"{duration}After the answer, give the time spans that support it as "
                     "<time>s to e</time> in seconds.")
    return "\n".join(lines)


def messages(qa: VideoQA) -> list[dict[str, Any]]:
    """Chat messages with the media placeholders the processor expands into visual tokens."""
    content: list[dict[str, Any]] = []
    if qa.video_file is not None:
        content.append({"type": "video"})
    if qa.image_file is not None:
        content.append({"type": "image"})
    content.append({"type": "text", "text": question_text(qa)})
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]


def target_text(qa: VideoQA) -> str:
    """The SFT target: the record's chain of thought (if any) and the gold answer tag."""
    think = qa.process if qa.process else "<think></think>"
    return f"{think}{qa.solution}"
