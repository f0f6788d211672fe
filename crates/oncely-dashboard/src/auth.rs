//! Authentication (token, cookie, or the embedder's hook) and the CSRF check of every POST.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use sha2::{Digest, Sha256};

use crate::pages::State as Dash;
use crate::Auth;

/// The cookie the login form sets.
const COOKIE: &str = "oncely_token";

/// Equal, in time independent of where they differ (both are hashed first, so lengths leak
/// nothing either).
pub(crate) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented(parts: &axum::http::request::Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some(t.trim().to_owned());
        }
    }
    parts.headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';')
            .map(str::trim)
            .find_map(|c| c.strip_prefix(COOKIE).and_then(|c| c.strip_prefix('=')).map(str::to_owned))
    })
}

/// The middleware in front of every dashboard page and action.
pub(crate) async fn require(State(dash): State<Arc<Dash>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let ok = match &dash.config.auth {
        Auth::Open => true,
        Auth::Token(token) => presented(&parts).is_some_and(|t| same(&t, token)),
        Auth::Hook(hook) => hook(&parts),
    };
    if !ok {
        let login = match dash.config.auth {
            Auth::Token(_) => "<p><a href=\"login\">Log in</a> (or send <code>Authorization: Bearer TOKEN</code>).</p>",
            _ => "",
        };
        return (StatusCode::UNAUTHORIZED, Html(format!("<h1>401 Unauthorized</h1>{login}"))).into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

/// GET /login: a form asking for the token.
pub(crate) async fn login_form() -> Html<&'static str> {
    Html(
        "<!doctype html><title>oncely: log in</title><form method=post action=login>\
         <label>Token <input type=password name=token autofocus></label> <button type=submit>Log in</button></form>",
    )
}

/// The login form's fields.
#[derive(serde::Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// POST /login: a right token sets the cookie.
pub(crate) async fn login(State(dash): State<Arc<Dash>>, Form(form): Form<Login>) -> Response {
    match &dash.config.auth {
        Auth::Token(token) if same(&form.token, token) => {
            let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", form.token);
            ([(header::SET_COOKIE, cookie)], Redirect::to("./")).into_response()
        }
        Auth::Token(_) => (StatusCode::UNAUTHORIZED, "wrong token").into_response(),
        _ => Redirect::to("./").into_response(),
    }
}

/// Why a POST was refused.
pub(crate) fn refuse_post(dash: &Dash, fields: &[(String, String)]) -> Option<Response> {
    if dash.config.read_only {
        return Some((StatusCode::FORBIDDEN, "the dashboard is read-only").into_response());
    }
    let token = fields.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str());
    if !token.is_some_and(|t| same(t, &dash.csrf)) {
        tracing::warn!("dashboard POST refused: missing or wrong CSRF token");
        return Some((StatusCode::FORBIDDEN, "missing or wrong CSRF token").into_response());
    }
    None
}
