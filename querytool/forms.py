"""Forms of the query page: the search, and the retrieve request."""

from __future__ import annotations

import re

from django import forms
from django.core.exceptions import ValidationError

from targets.query import Criteria
from targets.validators import validate_ae_title

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY = re.compile(r"^[A-Za-z0-9]{1,16}$")


_ACCESSION_SPLIT = re.compile(r"[\s,;]+")


def parse_accessions(text: str) -> list[str]:
    """Split a pasted list (commas, spaces, new lines); trim and drop duplicates."""
    seen: dict[str, None] = {}
    for part in _ACCESSION_SPLIT.split(text or ""):
        if part.strip():
            seen.setdefault(part.strip(), None)
    return list(seen)


def _source_choices(sources) -> list[tuple[str, str]]:
    return [(str(t.pk), f"{t.name} ({t.get_kind_display()})") for t in sources]


class SearchForm(forms.Form):
    source = forms.ChoiceField()
    patient_id = forms.CharField(label="Patient ID", required=False, max_length=64)
    patient_name = forms.CharField(
        label="Patient name",
        required=False,
        max_length=64,
        help_text="Wildcards * and ?, e.g. DOE^J*",
    )
    accessions = forms.CharField(
        label="Accession numbers",
        required=False,
        max_length=20000,
        widget=forms.Textarea(attrs={"rows": 2, "cols": 24}),
        help_text="One or many: commas, spaces or new lines.",
    )
    date_from = forms.DateField(
        label="Study date from",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
    )
    date_to = forms.DateField(
        label="to", required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    modality = forms.CharField(required=False, max_length=16)
    study_description = forms.CharField(
        label="Study description",
        required=False,
        max_length=64,
        help_text="Wildcards * and ?",
    )
    study_uid = forms.CharField(
        label="Study instance UID", required=False, max_length=64
    )

    def __init__(self, *args, sources=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["source"].choices = _source_choices(sources)
        self.sources = {str(t.pk): t for t in sources}

    def clean_study_uid(self) -> str:
        value = self.cleaned_data["study_uid"].strip()
        if value and not _UID.match(value):
            raise ValidationError("A UID is digits separated by dots.")
        return value

    def clean_modality(self) -> str:
        value = self.cleaned_data["modality"].strip().upper()
        if value and not _MODALITY.match(value):
            raise ValidationError("A modality is a short code such as CT or MR.")
        return value

    def clean_accessions(self) -> list[str]:
        values = parse_accessions(self.cleaned_data["accessions"])
        too_long = [v for v in values if len(v) > 16]
        if too_long:
            raise ValidationError(
                f"Accession numbers have at most 16 characters: {too_long[0]!r}."
            )
        if len(values) > 500:
            raise ValidationError("At most 500 accession numbers at once.")
        return values

    def clean(self):
        data = super().clean()
        lo, hi = data.get("date_from"), data.get("date_to")
        if lo and hi and lo > hi:
            self.add_error("date_to", "The end date is before the start date.")
        return data

    @property
    def target(self):
        return self.sources[self.cleaned_data["source"]]

    def criteria(self) -> Criteria:
        d = self.cleaned_data
        return Criteria(
            patient_id=d["patient_id"].strip(),
            patient_name=d["patient_name"].strip(),
            accessions=d["accessions"],
            date_from=d["date_from"],
            date_to=d["date_to"],
            modality=d["modality"],
            study_description=d["study_description"].strip(),
            study_uid=d["study_uid"],
        )


class RetrieveForm(forms.Form):
    """Studies (`study`, "uid|label") and series (`series`, "study|series|label")."""

    source = forms.ChoiceField()
    destination = forms.ChoiceField()
    move_aet = forms.CharField(
        label="C-MOVE destination AET",
        required=False,
        max_length=16,
        validators=[validate_ae_title],
    )

    def __init__(self, *args, sources=(), destinations=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["source"].choices = _source_choices(sources)
        self.sources = {str(t.pk): t for t in sources}
        self.destinations = {str(t.pk): t for t in destinations}
        self.fields["destination"].choices = destination_choices(destinations)

    def clean(self):
        data = super().clean()
        if data.get("destination") == "move" and not data.get("move_aet"):
            self.add_error("move_aet", "Enter the AE title the source should send to.")
        if data.get("destination") == "move" and data.get("source"):
            if not self.sources[data["source"]].as_kind().can_move:
                self.add_error("destination", "C-MOVE needs a DICOM source.")
        return data


def destination_choices(destinations) -> list[tuple[str, str]]:
    return (
        [("download", "Local download folder")]
        + [(str(t.pk), f"{t.name} ({t.get_kind_display()})") for t in destinations]
        + [("move", "C-MOVE to an AE title (DICOM sources)")]
    )
