"""URLs of the test Django project: the bounce view where a project would mount it."""

from django.urls import path

from appengine_mailer import views

urlpatterns = [path("mail/bounces/", views.bounce)]
