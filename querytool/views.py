"""The query page (`/query/`): thin views over `querytool.services`."""

from __future__ import annotations

from datetime import UTC, datetime

from django.contrib import admin, messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.paginator import Paginator
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import pluralize
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from targets.query import SourceError

from . import services
from .forms import RetrieveForm, SearchForm, destination_choices
from .models import RetrievalJob

PAGE_SIZE = 25
# Session keys: the destination chosen for the last retrieval stays chosen.
DESTINATION_KEY = "querytool_destination"
MOVE_AET_KEY = "querytool_move_aet"
SORTS = {
    "patient": lambda s: (s.patient_name.lower(), s.patient_id),
    "birth": lambda s: s.birth_date,
    "date": lambda s: (s.study_date, s.study_time),
    "accession": lambda s: s.accession,
    "description": lambda s: s.description.lower(),
    "modalities": lambda s: ",".join(s.modalities),
    "series": lambda s: s.series_count or 0,
    "instances": lambda s: s.instance_count or 0,
}
COLUMNS = [
    ("patient", "Patient"),
    ("birth", "Birth date"),
    ("date", "Study date"),
    ("accession", "Accession"),
    ("description", "Description"),
    ("modalities", "Modalities"),
    ("series", "Series"),
    ("instances", "Instances"),
]


def person_name(value: str) -> str:
    """A DICOM person name as people read it: "Smith^John^A" -> "Smith, John A"."""
    alphabetic = (value or "").split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    first = " ".join(p for p in (prefix, given, middle) if p)
    name = ", ".join(p for p in (family, first) if p)
    return f"{name}, {suffix}" if name and suffix else name or suffix


def _label(study) -> str:
    parts = [
        person_name(study.patient_name) or study.patient_id,
        _date(study.study_date),
        study.accession,
        study.description,
    ]
    return " · ".join(p for p in parts if p)


def _date(value: str) -> str:
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _url(request, **changes) -> str:
    params = request.GET.copy()
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return f"{request.path}?{params.urlencode()}"


@staff_member_required
def query_page(request):
    services.require_search(request.user)
    sources = services.query_sources()
    destinations = services.export_destinations(request.user)
    ctx = {
        **admin.site.each_context(request),
        "title": "Query and retrieve",
        "sources": sources,
        "can_retrieve": services.may_retrieve(request.user),
        "destination_choices": destination_choices(destinations),
        "chosen_destination": request.session.get(DESTINATION_KEY, ""),
        "chosen_move_aet": request.session.get(MOVE_AET_KEY, ""),
        "jobs": services.attach_deliveries(
            RetrievalJob.objects.select_related("created_by")[:30]
        ),
        "columns": COLUMNS,
    }
    submitted = "source" in request.GET
    form = SearchForm(
        request.GET if submitted else None,
        sources=sources,
        initial={"source": str(sources[0].pk)} if sources else None,
    )
    ctx["form"] = form
    if submitted and form.is_valid():
        source = form.target
        ctx["source"] = source
        ctx["is_folder"] = services.keeps_index(source)
        criteria = form.criteria()
        try:
            found = services.search(source, criteria, request.user)
        except SourceError as exc:
            ctx["error"] = exc.message
        else:
            studies = found.studies
            sort = request.GET.get("sort", "-date")
            key = SORTS.get(sort.lstrip("-"))
            if key:
                studies = sorted(studies, key=key, reverse=sort.startswith("-"))
            page = Paginator(studies, PAGE_SIZE).get_page(request.GET.get("page"))
            for study in page.object_list:
                study.label = _label(study)
                study.open_url = _url(request, study=study.study_uid)
                study.patient_name_display = person_name(study.patient_name)
                study.study_date_display = _date(study.study_date)
                study.birth_date_display = _date(study.birth_date)
            ctx.update(
                found=found,
                page=page,
                sort=sort,
                limit=_limit(),
                sort_links={
                    c: _url(request, sort=c if sort != c else f"-{c}", page=None)
                    for c, _ in COLUMNS
                },
                page_links={
                    "prev": _url(request, page=page.previous_page_number())
                    if page.has_previous()
                    else None,
                    "next": _url(request, page=page.next_page_number())
                    if page.has_next()
                    else None,
                },
            )
            if ctx["is_folder"]:
                ctx["index_info"] = _index_info(source)
            study_uid = request.GET.get("study")
            if study_uid:
                ctx["open_study"] = next(
                    (s for s in studies if s.study_uid == study_uid), None
                )
                ctx["close_url"] = _url(request, study=None)
                try:
                    ctx["series"] = services.list_series(
                        source, study_uid, request.user
                    )
                except SourceError as exc:
                    ctx["series_error"] = exc.message
                if ctx["open_study"] is not None:
                    ctx["open_study"].label = _label(ctx["open_study"])
    return render(request, "querytool/query.html", ctx)


def _index_info(source) -> dict | None:
    """Counts, last scan and unreadable files of a local folder's index."""
    try:
        info = source.query_source().index_info()
    except SourceError:
        return None
    last = info["last_scan"]
    return {**info, "last_scan": datetime.fromtimestamp(last, tz=UTC) if last else None}


def _back(request) -> str:
    """Where to return after a POST: the `next` page if it is ours, else the page."""
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(
        back, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return back
    return reverse("querytool:query")


def _limit() -> int:
    from django.conf import settings

    return settings.COURIER_QUERY_LIMIT


@staff_member_required
@require_POST
def retrieve(request):
    services.require_retrieve(request.user)
    sources = services.query_sources()
    # Every store target is a valid choice here: one the user may not export to is
    # refused (and audited) by the service, not silently dropped by the form.
    destinations = services.store_destinations()
    back = _back(request)
    form = RetrieveForm(request.POST, sources=sources, destinations=destinations)
    # The destination stays chosen for the next retrieval.
    if form.is_valid() or "destination" not in form.errors:
        request.session[DESTINATION_KEY] = request.POST.get("destination", "")
        request.session[MOVE_AET_KEY] = request.POST.get("move_aet", "")[:16]
    if not form.is_valid():
        for field, errors in form.errors.items():
            for error in errors:
                messages.error(
                    request,
                    f"{field.replace('_', ' ')}: {error}"
                    if field != "__all__"
                    else error,
                )
        return redirect(back)
    items = _items(request.POST.getlist("study"), request.POST.getlist("series"))
    if not items:
        messages.error(request, "Choose at least one study or series to retrieve.")
        return redirect(back)
    dest = form.cleaned_data["destination"]
    try:
        jobs = services.start_retrieval(
            form.sources[form.cleaned_data["source"]],
            items,
            request.user,
            destination=form.destinations.get(dest),
            download=dest == "download",
            move_aet=form.cleaned_data["move_aet"] if dest == "move" else "",
        )
    except SourceError as exc:
        messages.error(request, exc.message)
        return redirect(back)
    n = len(jobs)
    messages.success(request, f"Queued {n} retrieval{pluralize(n)}.")
    return redirect(back + "#jobs")


def _items(studies: list[str], series: list[str]) -> list[services.RetrieveItem]:
    """Checked studies ("uid|label") whole; checked series ("study|series|label")
    of other studies grouped per study. A whole study wins over its series."""
    whole: dict[str, services.RetrieveItem] = {}
    for value in studies:
        uid, _, label = value.partition("|")
        if uid:
            whole[uid] = services.RetrieveItem(uid, [], label)
    partial: dict[str, services.RetrieveItem] = {}
    for value in series:
        study_uid, _, rest = value.partition("|")
        series_uid, _, label = rest.partition("|")
        if not study_uid or not series_uid or study_uid in whole:
            continue
        item = partial.setdefault(
            study_uid, services.RetrieveItem(study_uid, [], label)
        )
        item.series_uids.append(series_uid)
    return list(whole.values()) + list(partial.values())


@staff_member_required
@require_POST
def reindex(request):
    services.require_search(request.user)
    source = next(
        (
            t
            for t in services.query_sources()
            if str(t.pk) == request.POST.get("source")
        ),
        None,
    )
    back = _back(request)
    if source is None:
        messages.error(request, "Unknown source.")
        return redirect(back)
    try:
        report = services.reindex(source, request.user)
    except SourceError as exc:
        messages.error(request, exc.message)
        return redirect(back)
    text = (
        f"Rescanned {source.name}: {report.seen} files, {report.added} added, "
        f"{report.updated} changed, {report.removed} removed in "
        f"{report.seconds:.1f} s."
    )
    if report.problems:
        shown = ", ".join(f"{p} ({r})" for p, r in report.problems[:10])
        more = len(report.problems) - 10
        text += (
            f" {len(report.problems)} not DICOM or unreadable: {shown}"
            + (f" and {more} more" if more > 0 else "")
            + "."
        )
        messages.warning(request, text)
    else:
        messages.success(request, text)
    return redirect(back)


@staff_member_required
def jobs_json(request):
    services.require_search(request.user)
    ids = [int(i) for i in request.GET.get("ids", "").split(",") if i.isdigit()]
    jobs = services.attach_deliveries(
        RetrievalJob.objects.filter(pk__in=ids)
        if ids
        else RetrievalJob.objects.all()[:30]
    )
    return JsonResponse({"jobs": [j.as_json() for j in jobs]})


@staff_member_required
@require_POST
def cancel_job(request, pk: int):
    job = get_object_or_404(RetrievalJob, pk=pk)
    services.cancel_retrieval(job, request.user)
    messages.info(request, f"Cancel requested for retrieval #{pk}.")
    return redirect(reverse("querytool:query") + "#jobs")


@staff_member_required
@require_POST
def retry_job(request, pk: int):
    job = get_object_or_404(RetrievalJob, pk=pk)
    if services.retry_retrieval(job, request.user):
        messages.success(request, f"Retrieval #{pk} queued again.")
    else:
        messages.error(
            request,
            f"Retrieval #{pk} is not finished with a failure: nothing to retry.",
        )
    return redirect(reverse("querytool:query") + "#jobs")
