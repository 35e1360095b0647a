"""`mailer web`: the operators' dashboard (Starlette, Jinja2 with autoescape, htmx).

`app.create_app` builds the application; `accounts` holds the users; `auth` the sessions,
CSRF tokens and roles; a module of routes per page family (overview, campaigns, recipients,
suppressions, actions, audit) renders what the read side and the shared actions return.
"""
