from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import render


@staff_member_required
def query_page(request):
    return render(request, "querytool/query.html", {})
