"""`backprop ui`: a local web app that validates data, trains, watches, exports and chats.

An optional extra (`pip install 'backpropagate[ui]'`): Starlette + uvicorn serve
server-rendered Jinja2 pages with a little vanilla JavaScript (no CDN: every script and
style comes from this package). Training runs as a `backprop train` worker process, so
the web server only starts, stops and reads runs. All file access goes through one
workspace folder; see `security` for the login, cookie, CSRF and Origin rules.
"""
