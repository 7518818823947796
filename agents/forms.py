"""The request form and the clarifying-answers form.

Limits come from settings at form construction time, so the number the form states and the
number it enforces are always the same one.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings

from agents.options import DEFAULT_OPTIONS, OPTION_FIELDS, validate_options

DEFAULT_DESIGN_MAX_CHARS = 4000
ANSWER_MAX_CHARS = 1000


def design_max_chars() -> int:
    return int(getattr(settings, "DESIGN_MAX_CHARS", DEFAULT_DESIGN_MAX_CHARS))


class DesignRequestForm(forms.Form):
    """What to design, the six options every agent's prompt receives, and whether to ask first."""

    request_text = forms.CharField(
        label="What should the architects design?",
        widget=forms.Textarea(
            attrs={
                "rows": 8,
                "placeholder": "e.g. An online shop for 50,000 daily users in Europe, with "
                "payments, a product catalogue and nightly reporting.",
            }
        ),
        error_messages={"required": "Describe what you need: the request cannot be empty."},
    )
    ask_questions = forms.BooleanField(label="Ask me clarifying questions first", required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_chars = design_max_chars()
        text_field = self.fields["request_text"]
        text_field.widget.attrs["maxlength"] = str(self.max_chars)
        text_field.widget.attrs["data-max-chars"] = str(self.max_chars)
        text_field.help_text = f"Plain language, up to {self.max_chars:,} characters."
        for key, (label, choices) in OPTION_FIELDS.items():
            self.fields[key] = forms.ChoiceField(
                label=label, choices=choices.choices, initial=DEFAULT_OPTIONS[key]
            )

    def clean_request_text(self) -> str:
        # CharField strips, so whitespace-only text already failed as "required" here.
        # Browsers send CRLF line ends but count a newline as one character in `maxlength`.
        text: str = self.cleaned_data["request_text"].replace("\r\n", "\n")
        if len(text) > self.max_chars:
            raise forms.ValidationError(
                f"Your request is {len(text):,} characters long; the limit is "
                f"{self.max_chars:,}. Please shorten it.",
                code="max_length",
            )
        return text

    @property
    def option_fields(self) -> list[forms.BoundField]:
        return [self[key] for key in OPTION_FIELDS]

    def options(self) -> dict[str, str]:
        """The validated options, in the shape `Design.options` stores."""
        return validate_options({key: self.cleaned_data[key] for key in OPTION_FIELDS})


class ClarificationForm(forms.Form):
    """One optional answer per clarifying question; a blank answer means 'no answer'."""

    def __init__(self, questions: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.questions = questions
        for index, question in enumerate(questions):
            self.fields[f"answer_{index}"] = forms.CharField(
                label=question,
                required=False,
                max_length=ANSWER_MAX_CHARS,
                widget=forms.Textarea(attrs={"rows": 2}),
            )

    def answers(self) -> list[dict[str, str | None]]:
        """Clarifications in `Design.clarifications` shape; an empty answer is stored as None."""
        return [
            {
                "question": question,
                "answer": self.cleaned_data.get(f"answer_{index}") or None,
            }
            for index, question in enumerate(self.questions)
        ]
