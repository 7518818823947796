"""Pages of the agents app, plus Django's own logout view (login: carlos.login)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from agents import history, views

urlpatterns = [
    path("", views.new_design, name="design-new"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("designs/", history.design_list, name="design-list"),
    path("designs/<int:design_id>/", views.design_detail, name="design-detail"),
    path("designs/<int:design_id>/answers/", views.answer_questions, name="design-answers"),
    path("designs/<int:design_id>/retry/", views.retry, name="design-retry"),
    path("designs/<int:design_id>/cancel/", views.cancel, name="design-cancel"),
    path("designs/<int:design_id>/delete/", views.delete, name="design-delete"),
    path("designs/<int:design_id>/runs/<int:run_id>/", views.run_output, name="design-run"),
    path("designs/<int:design_id>/download/", views.download_package, name="design-download"),
    path("designs/<int:design_id>/terraform.zip", views.terraform_zip, name="design-terraform"),
]
