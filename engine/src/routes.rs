//! The engine's HTTP routes: which handler answers what, behind which limits and middleware.
//! Above the API's handlers, FleetLock and auth; nothing imports it but the daemon.

use crate::api::*;
use crate::auth::{Auth, Role};
use crate::http::{
    batch_limit, count_request, method_not_allowed, refuse, refuse_oversized, server_header, ApiError, MAX_BODY_BYTES,
};
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

/// The role a route needs, declared beside its handler (see [`crate::auth::needs`]).
macro_rules! needs {
    ($role:ident) => {
        axum::middleware::from_fn_with_state(Role::$role, crate::auth::needs)
    };
}

/// The API behind its auth middleware: every request is identified first; each route says which
/// role it needs.
pub fn router(api: Api, auth: std::sync::Arc<Auth>) -> Router {
    use axum::routing::post;
    let v1 = Router::new()
        .route(
            "/units",
            get(list_units.layer(needs!(Read)))
                .post(create_units.layer(batch_limit()).layer(needs!(Admin)))
                .fallback(|req| refuse(req, method_not_allowed("only GET and POST supported against this resource"))),
        )
        .route(
            "/units/{name}",
            get(get_unit.layer(needs!(Read)))
                .put(put_unit.layer(needs!(Operate)))
                .delete(delete_unit.layer(needs!(Admin)))
                .fallback(|req| {
                    refuse(req, method_not_allowed("only GET, PUT and DELETE supported against this resource"))
                }),
        )
        // Reads and waits that need a body for their list of units.
        .route("/units:batchGet", post(crate::batch::batch_get.layer(batch_limit()).layer(needs!(Read))))
        .route("/units:wait", post(crate::batch::wait.layer(batch_limit()).layer(needs!(Read))))
        .route("/units:batchUpdate", post(crate::batch::batch_update.layer(batch_limit()).layer(needs!(Operate))))
        .route("/units:batchDelete", post(crate::batch::batch_delete.layer(batch_limit()).layer(needs!(Admin))))
        .route("/units/{name}/status", get(unit_status.layer(needs!(Read))))
        .route("/units/{name}/journal", get(unit_journal.layer(needs!(Read))))
        .route(
            "/units/{name}/move",
            post(move_unit.layer(needs!(Operate))).delete(forget_move.layer(needs!(Operate))).fallback(|req| {
                refuse(req, method_not_allowed("only POST and DELETE supported against this resource"))
            }),
        )
        .route(
            "/rollouts",
            get(list_rollouts.layer(needs!(Read)))
                .post(create_rollout.layer(needs!(Admin)))
                .fallback(|req| refuse(req, method_not_allowed("only GET and POST supported against this resource"))),
        )
        .route(
            "/rollouts/{service}",
            get(get_rollout.layer(needs!(Read)))
                .fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        .route(
            "/rollouts/{service}/{action}",
            post(rollout_action.layer(needs!(Operate)))
                .fallback(|req| refuse(req, method_not_allowed("only POST supported against this resource"))),
        )
        .route(
            "/state",
            get(list_states.layer(needs!(Read)))
                .fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        .route(
            "/state:stream",
            get(stream_states.layer(needs!(Read)))
                .fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        .route(
            "/state/{name}",
            get(get_state.layer(needs!(Read)))
                .fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        .route(
            "/machines",
            get(list_machines.layer(needs!(Read)))
                .patch(patch_machines.layer(needs!(Admin)))
                .fallback(|req| refuse(req, method_not_allowed("only GET and PATCH supported against this resource"))),
        )
        .route(
            "/openapi.json",
            get((|| async { ([(header::CONTENT_TYPE, "application/json")], crate::openapi::document()) })
                .layer(needs!(Read))),
        )
        .route(
            "/machines/{id}/drain",
            post(drain_machine.layer(needs!(Admin))).delete(undrain_machine.layer(needs!(Admin))).fallback(|req| {
                refuse(req, method_not_allowed("only POST and DELETE supported against this resource"))
            }),
        )
        // Not in the original API: the event history, and its live stream (server-sent events).
        .route(
            "/events",
            get(list_events.layer(needs!(Read)))
                .fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        .route(
            "/events/stream",
            get(stream_events.layer(needs!(Read)))
                .fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        // Not in the original API: join tokens (docs/install.md).
        .route(
            "/join-tokens",
            get(list_join_tokens.layer(needs!(Admin)))
                .post(create_join_token.layer(needs!(Admin)))
                .fallback(|req| refuse(req, method_not_allowed("only GET and POST supported against this resource"))),
        )
        .route(
            "/join-tokens/{id}",
            axum::routing::delete(revoke_join_token.layer(needs!(Admin)))
                .fallback(|req| refuse(req, method_not_allowed("only DELETE supported against this resource"))),
        )
        .route(
            "/discovery",
            get(discovery.layer(needs!(Read)))
                .fallback(|req| refuse(req, ApiError::bad_request("only HTTP GET supported against this resource"))),
        );
    let v1 = v1
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_oversized));
    let not_allowed = |req| refuse(req, ApiError::new(StatusCode::METHOD_NOT_ALLOWED, ""));
    let authenticated = Router::new()
        .nest("/fleet/v1", v1.clone())
        // The original's legacy prefix, with the same handlers.
        .nest("/v1-alpha", v1)
        .route("/fleet/v1", axum::routing::any(not_allowed))
        .route("/engine/status", get(engine_status.layer(needs!(Read))))
        .route("/metrics", get(metrics.layer(needs!(Read))))
        // FleetLock: any machine, for itself (its handler checks that it acts for itself).
        .route("/v1/pre-reboot", post(crate::fleetlock::pre_reboot.layer(needs!(Machine))))
        .route("/v1/steady-state", post(crate::fleetlock::steady_state.layer(needs!(Machine))))
        .fallback(|req| refuse(req, ApiError::new(StatusCode::NOT_FOUND, "")))
        .layer(axum::middleware::from_fn_with_state(auth.clone(), crate::auth::authorize));
    // Joining: the token is the credential, checked by the handler (which audits every attempt);
    // the CA is public (a joining machine checks it against its pin).
    let joining = Router::new()
        .route(
            "/fleet/v1/join",
            post(join)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
                .fallback(|req| refuse(req, method_not_allowed("only POST supported against this resource"))),
        )
        .with_state((api.clone(), auth))
        .route(
            "/fleet/v1/join/ca",
            get(join_ca).fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        );
    // The dashboard's page and script, which hold no data, outside the auth layer.
    authenticated
        .merge(joining)
        .merge(crate::ui::router())
        .layer(axum::middleware::from_fn_with_state(api.metrics.clone(), crate::metrics::observe))
        .layer(axum::middleware::from_fn_with_state(api.requests.clone(), count_request))
        .layer(axum::middleware::map_response(server_header))
        .with_state(api)
}

/// Only `/metrics`, without auth, for a plain listener on loopback (`metrics_listen`).
pub fn metrics_router(api: Api) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(api)
}

/// fleet's discovery document (Google discovery format); `$ENDPOINT` is left for clients to fill.
pub const DISCOVERY: &str = include_str!("discovery.json");

pub(crate) async fn discovery() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DISCOVERY).into_response()
}

/// Not part of fleet's API: Prometheus metrics (docs/metrics.md); the cluster's size is read
/// from the view now, the rest was recorded as it happened.
pub(crate) async fn metrics(State(api): State<Api>) -> Response {
    let m = &api.metrics;
    if !m.on() {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics are switched off on this engine (metrics = false in its configuration)",
        )
        .into_response();
    }
    let (units, machines, revision) = api.cluster.read(|v| (v.units.len(), v.machines.len(), v.revision));
    m.units.set(units as i64);
    m.machines.set(machines as i64);
    m.set_view(revision);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.render()).into_response()
}

/// Not part of fleet's API: which engine leads, and why units could not be placed.
pub(crate) async fn engine_status(State(api): State<Api>) -> Response {
    let status = api.status.lock().map(|s| s.clone()).unwrap_or_default();
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("revision".into(), api.cluster.revision().into());
        o.insert("requests".into(), api.requests.load(std::sync::atomic::Ordering::Relaxed).into());
    }
    Json(v).into_response()
}
