"""The admin's target form: validation through the kind's proxy, write-only secrets."""

from __future__ import annotations

import logging

from django import forms
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.utils.html import conditional_escape, format_html

from .models import Kind, Target
from .secrets import EncryptedTextField

log = logging.getLogger(__name__)


def is_secret_field(model: type[Target], name: str) -> bool:
    try:
        return isinstance(model._meta.get_field(name), EncryptedTextField)
    except Exception:
        return False


class SecretWidget(forms.MultiWidget):
    """A write-only input: says whether the secret is set, never shows its value.

    The first sub-input takes a new value (blank keeps the current one), the second is
    a "clear" checkbox, shown only when a value is set.
    """

    def __init__(self, multiline: bool = False, attrs=None):
        entry = (
            forms.Textarea(attrs={"rows": 4, "cols": 64})
            if multiline
            else forms.PasswordInput(render_value=False)
        )
        super().__init__([entry, forms.CheckboxInput()], attrs)
        self.is_set = False

    def decompress(self, value):
        # Whatever the current value is, nothing of it goes back to the browser.
        return [None, False]

    def render(self, name, value, attrs=None, renderer=None):
        attrs = dict(attrs or {})
        base_id = attrs.pop("id", f"id_{name}")
        entry_attrs = {
            **attrs,
            "id": f"{base_id}_0",
            "autocomplete": "new-password",
            "placeholder": "leave blank to keep" if self.is_set else "",
        }
        entry = self.widgets[0].render(f"{name}_0", None, entry_attrs, renderer)
        status = "set" if self.is_set else "not set"
        if not self.is_set:
            return format_html(
                '<div class="secret-input"><strong class="secret-status">{}</strong>'
                "<br>{}</div>",
                status,
                entry,
            )
        clear = self.widgets[1].render(
            f"{name}_1", False, {"id": f"{base_id}_1"}, renderer
        )
        return format_html(
            '<div class="secret-input"><strong class="secret-status">{}</strong>'
            ' <label for="{}_1" class="vCheckboxLabel">{} clear</label><br>{}</div>',
            status,
            base_id,
            clear,
            entry,
        )

    def id_for_label(self, id_):
        return f"{id_}_0" if id_ else id_


class SecretField(forms.MultiValueField):
    """Cleans to `(new_value, clear)`; `TargetForm.clean` turns it into the value."""

    def __init__(self, *, multiline: bool = False, **kwargs):
        kwargs.pop("max_length", None)
        kwargs.pop("empty_value", None)
        kwargs.update(required=False, require_all_fields=False)
        super().__init__(
            fields=(
                forms.CharField(required=False, strip=False),
                forms.BooleanField(required=False),
            ),
            widget=SecretWidget(multiline=multiline),
            **kwargs,
        )

    def compress(self, data_list):
        if not data_list:
            return ("", False)
        value, clear = (list(data_list) + ["", False])[:2]
        return (value or "", bool(clear))

    def has_changed(self, initial, data):
        value, clear = self.compress(
            [self.fields[0].clean(d) if i == 0 else d for i, d in enumerate(data or [])]
        )
        return bool(value) or clear


# Where a target's credentials go. Changing one of these must not carry the stored
# secrets (or the old server's pinned SSH host key) to the new place: whoever may
# edit a target could otherwise point it at their own server, press Test, and read
# the password there. They are kept only when entered again in the same save.
ADDRESS_FIELDS = ("host", "port", "url", "username", "endpoint_url", "access_key_id")
PIN_FIELDS = ("host_key", "host_key_type", "host_key_data")
REPOINT_NOTE = (
    "Changing the host, port, URL or username (S3: endpoint URL or access key id) "
    "clears the stored secrets and the pinned host key, unless you enter them "
    "again in the same save."
)


class TargetForm(forms.ModelForm):
    """Base form for every kind; the admin builds it for the kind's proxy model.

    Validation is the proxy's `full_clean()` (via ModelForm), so bad settings become
    form errors. The name is unique without regard to case.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._meta.model
        self.secret_fields = [n for n in self.fields if is_secret_field(model, n)]
        for name in self.secret_fields:
            old = self.fields[name]
            field = SecretField(
                multiline=name == "private_key",
                label=old.label,
                help_text=old.help_text
                or "Stored encrypted; never shown. Leave blank to keep.",
            )
            field.widget.is_set = bool(
                self.instance.pk and getattr(self.instance, name)
            )
            self.fields[name] = field
            # The current value must not reach the page through `initial` either.
            self.initial.pop(name, None)
        for name, text in getattr(model, "help_texts", {}).items():
            if name in self.fields:
                self.fields[name].help_text = text
        if "layout" in self.fields:
            from .series import HEADER_TAGS

            self.fields["layout"].help_text = (
                "Folders under the path, from DICOM keywords in braces; the default "
                "is {StudyInstanceUID}/{SeriesInstanceUID}. Keywords: "
                + ", ".join(HEADER_TAGS)
                + "."
            )
        kind = Kind(model.KIND).label if model.KIND else ""
        for name in getattr(model, "required_fields", ()):
            if name in self.fields:
                # Marked required in the page; the message is the model's own.
                field = self.fields[name]
                field.required = True
                label = model._meta.get_field(name).verbose_name
                field.error_messages["required"] = f"A {kind} target needs a {label}."
        for field in self.fields.values():
            # The admin renders help text as HTML: a literal "<script>" in one once
            # swallowed the rest of the form. Help text here is plain text.
            field.help_text = conditional_escape(field.help_text)

    def clean_name(self) -> str:
        name = (self.cleaned_data.get("name") or "").strip()
        clash = Target.objects.filter(name__iexact=name)
        if self.instance.pk:
            clash = clash.exclude(pk=self.instance.pk)
        if name and clash.exists():
            raise forms.ValidationError(
                "A target named %(other)s already exists (names ignore case).",
                params={"other": clash.first().name},
                code="unique_name",
            )
        return name

    def repointed(self) -> list[str]:
        """The address fields this save changes (none for a new target)."""
        if not self.instance.pk:
            return []
        return [
            f for f in ADDRESS_FIELDS if f in self.fields and f in self.changed_data
        ]

    def clean(self):
        cleaned = super().clean()
        moved = self.repointed()
        # Secrets (and the pin) this save drops because the target moved.
        self.cleared: list[str] = []
        for name in self.secret_fields:
            value, clear = cleaned.get(name) or ("", False)
            current = getattr(self.instance, name, "") or ""
            if value:
                cleaned[name] = value
            elif clear or moved:
                cleaned[name] = ""
                if moved and current and not clear:
                    self.cleared.append(name)
            else:
                cleaned[name] = current
        if moved and self.instance.host_key and "host_key" not in self.changed_data:
            if "host_key" in self.fields:
                cleaned["host_key"] = ""
            self.cleared.append("host_key")
        if moved or "host_key" in self.changed_data:
            # The full key belongs to the old pin: never kept beside a new one.
            self.instance.host_key_type = self.instance.host_key_data = ""
        return cleaned

    def cleared_labels(self) -> list[str]:
        return [
            str(self._meta.model._meta.get_field(name).verbose_name)
            for name in getattr(self, "cleared", [])
        ]

    def _post_clean(self) -> None:
        # The proxy's clean() may touch files or libraries (certificates, keys); a
        # surprise there must be a form error, not a server error.
        try:
            super()._post_clean()
            self._explain_cleared()
        except ValidationError:
            raise
        except Exception as exc:
            log.error(
                "target form validation crashed kind=%s error=%s",
                self.instance.kind,
                type(exc).__name__,
            )
            self.add_error(
                None,
                f"These settings could not be checked ({type(exc).__name__}); "
                "see the log.",
            )

    def _explain_cleared(self) -> None:
        """A secret this kind needs, dropped because the target moved, gets the
        reason beside the model's "needs a password"."""
        moved = ", ".join(
            str(self._meta.model._meta.get_field(f).verbose_name)
            for f in self.repointed()
        )
        for name in getattr(self, "cleared", []):
            if name in self.errors:
                self.errors[name].append(
                    f"The stored value was cleared because the {moved} changed: "
                    "enter it again to keep using it."
                )

    def add_error(self, field, error) -> None:
        """Show a model error for a field this kind's form lacks as a form error."""
        if (
            field is None
            and isinstance(error, ValidationError)
            and hasattr(error, "error_dict")
        ):
            known: dict[str, list] = {}
            for name, errors in error.error_dict.items():
                if name in self.fields and self.has_error(name, "required"):
                    continue  # the form already said it is missing
                if name == NON_FIELD_ERRORS or name in self.fields:
                    known.setdefault(name, []).extend(errors)
                    continue
                label = name
                try:
                    label = str(self._meta.model._meta.get_field(name).verbose_name)
                except Exception:
                    pass
                known.setdefault(NON_FIELD_ERRORS, []).extend(
                    ValidationError(f"{label.capitalize()}: {message}")
                    for e in errors
                    for message in e.messages
                )
            error = ValidationError(known)
        super().add_error(field, error)
