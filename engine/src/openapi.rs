//! The OpenAPI description of the engine's API, generated from these definitions with utoipa and
//! served at `/fleet/v1/openapi.json`. A contract test sends a request to every operation listed
//! here and checks the server answers with one of the documented statuses, and a unit test keeps
//! `docs/openapi.json` equal to what is generated.
// The operations below are bodiless functions: utoipa reads their attributes, the router in
// api.rs serves them. The types are fleet-api's, the ones the engine answers with.
#![allow(dead_code)]

use fleet_api::{
    AgentStatus, Changed, CreateUnits, Created, Destroyed, DrainAccepted, ErrorBody as Error, ErrorDetail, Event,
    EventPage, Found, JoinRequest, JoinTokenCreated, JoinTokenInfo, JoinTokenPage, JoinTokenRequest, Joined, Machine,
    MachinePage, MetadataOp, MoveAccepted, MoveRequest, Names, Rollout, RolloutInstance, RolloutList, RolloutRequest,
    StateStreamHead, Unit, UnitChange, UnitChanges, UnitError, UnitOption, UnitPage, UnitState, UnitStatePage,
    UnitStatuses, Until, WaitEvent, WaitRequest,
};
use utoipa::OpenApi;

/// List units, a page at a time. Not in the original API: `pageSize`, and the filters
/// `unitName` (names or globs, comma-separated), `state` (current state, or `unplaced`) and
/// `view=basic` (units without their options).
#[utoipa::path(get, path = "/fleet/v1/units",
    params(("nextPageToken" = Option<String>, Query), ("pageSize" = Option<u16>, Query, description = "1 to 10000"),
        ("unitName" = Option<String>, Query, description = "unit names or globs, comma-separated"),
        ("state" = Option<String>, Query, description = "inactive, loaded, launched or unplaced"),
        ("view" = Option<String>, Query, description = "basic: without options; full (default)")),
    responses((status = 200, body = UnitPage), (status = 400, body = Error), (status = 503, body = Error)))]
fn list_units() {}

#[utoipa::path(get, path = "/fleet/v1/units/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Unit), (status = 400, body = Error), (status = 404, body = Error)))]
fn get_unit() {}

/// Not in the original API: create up to 10,000 new units in one request (each with `name`,
/// `options` and optionally `desiredState`). All are validated first; 409 if one exists already.
#[utoipa::path(post, path = "/fleet/v1/units", request_body = CreateUnits,
    responses((status = 201, body = Created), (status = 400, body = Error), (status = 409, body = Error),
        (status = 415, body = Error), (status = 503, body = Error)))]
fn create_units() {}

/// Create a unit (201), replace its contents (201) or change its desired state (204).
/// Not in the original API: up to 10,000 units in one read, with what their machines report
/// and which do not exist.
#[utoipa::path(post, path = "/fleet/v1/units:batchGet", operation_id = "units_batch_get", request_body = Names,
    responses((status = 200, body = Found), (status = 400, body = Error), (status = 415, body = Error),
        (status = 503, body = Error)))]
fn units_batch_get() {}

/// Not in the original API: change the desired state (and, with role admin, the unit file) of
/// up to 10,000 existing units. Validated as a whole first (every refused unit is listed in the
/// error's `units`); written in transactions of at most 60 units, each all-or-nothing.
#[utoipa::path(post, path = "/fleet/v1/units:batchUpdate", operation_id = "units_batch_update",
    request_body = UnitChanges,
    responses((status = 200, body = Changed), (status = 400, body = Error), (status = 404, body = Error),
        (status = 409, body = Error), (status = 415, body = Error), (status = 503, body = Error)))]
fn units_batch_update() {}

/// Not in the original API: destroy up to 10,000 units.
#[utoipa::path(post, path = "/fleet/v1/units:batchDelete", operation_id = "units_batch_delete",
    request_body = Names,
    responses((status = 200, body = Destroyed), (status = 400, body = Error), (status = 415, body = Error),
        (status = 503, body = Error)))]
fn units_batch_delete() {}

/// Not in the original API: wait for up to 10,000 units. The answer is a stream of JSON objects,
/// one a line (`WaitEvent`): one for each unit as it gets there (with its machine) or as it is
/// known it will not (`error`: unplaceable, failed, destroyed), a heartbeat with the number still
/// pending every 5 s, and a last one with `done` and how many did not get there in time.
#[utoipa::path(post, path = "/fleet/v1/units:wait", operation_id = "units_wait", request_body = WaitRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = WaitEvent),
        (status = 400, body = Error), (status = 415, body = Error), (status = 503, body = Error)))]
fn units_wait() {}

#[utoipa::path(put, path = "/fleet/v1/units/{name}", params(("name" = String, Path)), request_body = Unit,
    responses((status = 201), (status = 204), (status = 400, body = Error), (status = 409, body = Error),
        (status = 415, body = Error), (status = 503, body = Error)))]
fn put_unit() {}

#[utoipa::path(delete, path = "/fleet/v1/units/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 400, body = Error), (status = 404, body = Error)))]
fn delete_unit() {}

#[utoipa::path(post, path = "/fleet/v1/units/{name}/move", params(("name" = String, Path)), request_body = MoveRequest,
    responses((status = 202, body = MoveAccepted), (status = 400, body = Error), (status = 404, body = Error), (status = 409, body = Error)))]
fn move_unit() {}

#[utoipa::path(delete, path = "/fleet/v1/units/{name}/move", params(("name" = String, Path)),
    responses((status = 204), (status = 400, body = Error)))]
fn forget_move() {}

#[utoipa::path(get, path = "/fleet/v1/units/{name}/status", params(("name" = String, Path), ("machineID" = Option<String>, Query)),
    responses((status = 200, body = UnitStatuses), (status = 400, body = Error), (status = 404, body = Error),
        (status = 409, body = Error), (status = 502, body = Error)))]
fn unit_status() {}

#[utoipa::path(get, path = "/fleet/v1/units/{name}/journal",
    params(("name" = String, Path), ("machineID" = Option<String>, Query), ("lines" = Option<u32>, Query),
        ("follow" = Option<bool>, Query), ("output" = Option<String>, Query)),
    responses((status = 200, content_type = "text/plain"), (status = 400, body = Error), (status = 404, body = Error),
        (status = 409, body = Error), (status = 502, body = Error)))]
fn unit_journal() {}

#[utoipa::path(get, path = "/fleet/v1/state",
    params(("nextPageToken" = Option<String>, Query), ("unitName" = Option<String>, Query), ("machineID" = Option<String>, Query),
        ("pageSize" = Option<u16>, Query, description = "1 to 10000")),
    responses((status = 200, body = UnitStatePage), (status = 400, body = Error)))]
fn list_states() {}

/// Not in the original API: every state (or one unit's, or one machine's) in one streaming answer,
/// one JSON object a line: first a `StateStreamHead` (how many rows, the longest value of each
/// field), then each `UnitState` in unit, then machine order. Read from the view a chunk at a
/// time: the first rows come at once whatever the size, and a long stream does not hold the view.
#[utoipa::path(get, path = "/fleet/v1/state:stream",
    params(("unitName" = Option<String>, Query), ("machineID" = Option<String>, Query)),
    responses((status = 200, content_type = "application/x-ndjson", body = UnitState), (status = 400, body = Error),
        (status = 503, body = Error)))]
fn stream_states() {}

#[utoipa::path(get, path = "/fleet/v1/state/{name}", params(("name" = String, Path)),
    responses((status = 200, body = UnitState), (status = 400, body = Error), (status = 404, body = Error)))]
fn get_state() {}

#[utoipa::path(get, path = "/fleet/v1/machines",
    params(("nextPageToken" = Option<String>, Query), ("pageSize" = Option<u16>, Query, description = "1 to 10000")),
    responses((status = 200, body = MachinePage), (status = 400, body = Error)))]
fn list_machines() {}

/// Add, replace or remove machine metadata; all operations or none.
#[utoipa::path(patch, path = "/fleet/v1/machines", request_body = Vec<MetadataOp>,
    responses((status = 204), (status = 400, body = Error)))]
fn patch_machines() {}

/// Drain a machine (fleet-rs addition): its units move elsewhere and it takes no new ones.
#[utoipa::path(post, path = "/fleet/v1/machines/{id}/drain", params(("id" = String, Path, description = "machine id or unique prefix")),
    responses((status = 202, body = DrainAccepted), (status = 400, body = Error), (status = 404, body = Error)))]
fn drain_machine() {}

/// Undrain a machine.
#[utoipa::path(delete, path = "/fleet/v1/machines/{id}/drain", params(("id" = String, Path)),
    responses((status = 204), (status = 400, body = Error), (status = 404, body = Error)))]
fn undrain_machine() {}

/// Not in the original API: what happened in the cluster, oldest first: the events this engine
/// keeps (`event_history`, default 10,000) after `since`. An event's id is `REVISION.N` (the etcd
/// revision it happened at), the same on every engine. A `since` older than what is kept gets a
/// `gap` event first. `kind`: kinds or globs over them, comma-separated (`unit-started,machine-*`).
#[utoipa::path(get, path = "/fleet/v1/events",
    params(("since" = Option<String>, Query, description = "after this event id (REVISION.N); 0: from the oldest kept"),
        ("unit" = Option<String>, Query, description = "unit names or globs, comma-separated"),
        ("machine" = Option<String>, Query, description = "a machine id or its prefix"),
        ("kind" = Option<String>, Query, description = "event kinds or globs, comma-separated"),
        ("limit" = Option<usize>, Query, description = "page size"),
        ("tail" = Option<usize>, Query, description = "only the last N matching events")),
    responses((status = 200, body = EventPage), (status = 400, body = Error), (status = 404, body = Error),
        (status = 503, body = Error)))]
fn list_events() {}

/// Not in the original API: the live event stream (server-sent events; each `data:` is one
/// `Event`, each `id:` its id). Without `since` it starts now; a client reconnecting sends
/// `Last-Event-ID` (as browsers' EventSource does) and misses nothing that is still kept. The
/// same filters as `GET /fleet/v1/events`.
#[utoipa::path(get, path = "/fleet/v1/events/stream",
    params(("since" = Option<String>, Query), ("unit" = Option<String>, Query), ("machine" = Option<String>, Query),
        ("kind" = Option<String>, Query), ("Last-Event-ID" = Option<String>, Header)),
    responses((status = 200, content_type = "text/event-stream", body = Event), (status = 400, body = Error),
        (status = 404, body = Error), (status = 503, body = Error)))]
fn stream_events() {}

/// Not in the original API: make a join token for new machines (docs/install.md). The answer is
/// the only one ever holding the token's secret.
#[utoipa::path(post, path = "/fleet/v1/join-tokens", request_body = JoinTokenRequest,
    responses((status = 201, body = JoinTokenCreated), (status = 400, body = Error), (status = 404, body = Error),
        (status = 415, body = Error)))]
fn create_join_token() {}

/// The join tokens (never their secrets).
#[utoipa::path(get, path = "/fleet/v1/join-tokens", responses((status = 200, body = JoinTokenPage)))]
fn list_join_tokens() {}

/// Revoke a join token: it admits nobody from now on.
#[utoipa::path(delete, path = "/fleet/v1/join-tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 400, body = Error), (status = 404, body = Error)))]
fn revoke_join_token() {}

/// The cluster CA (PEM), to anyone: a joining machine checks it against its pin.
#[utoipa::path(get, path = "/fleet/v1/join/ca", security(()),
    responses((status = 200, content_type = "application/x-pem-file", body = String), (status = 404, body = Error)))]
fn join_ca() {}

/// A machine joins with a join token, its only credential: the engine signs the machine's
/// certificate signing request and makes its etcd user.
#[utoipa::path(post, path = "/fleet/v1/join", request_body = JoinRequest, security(()),
    responses((status = 200, body = Joined), (status = 400, body = Error), (status = 401, body = Error),
        (status = 403, body = Error), (status = 404, body = Error), (status = 409, body = Error),
        (status = 413, body = Error), (status = 415, body = Error), (status = 503, body = Error)))]
fn join() {}

/// Not in the original API: roll a new version (the unit file in `options`) over a service's
/// launched instances, a few at a time, going back by itself when one does not become healthy
/// (docs/services.md). One rollout per service at a time (409 otherwise).
#[utoipa::path(post, path = "/fleet/v1/rollouts", request_body = RolloutRequest,
    responses((status = 201, body = Rollout), (status = 400, body = Error), (status = 404, body = Error),
        (status = 409, body = Error), (status = 415, body = Error), (status = 503, body = Error)))]
fn create_rollout() {}

/// Every service's last rollout.
#[utoipa::path(get, path = "/fleet/v1/rollouts", responses((status = 200, body = RolloutList), (status = 503, body = Error)))]
fn list_rollouts() {}

/// A service's last rollout, with its instances.
#[utoipa::path(get, path = "/fleet/v1/rollouts/{service}", params(("service" = String, Path)),
    responses((status = 200, body = Rollout), (status = 400, body = Error), (status = 404, body = Error),
        (status = 503, body = Error)))]
fn get_rollout() {}

/// `pause`, `resume`, `promote` (the canaries) or `undo` (go back to the previous version).
#[utoipa::path(post, path = "/fleet/v1/rollouts/{service}/{action}",
    params(("service" = String, Path), ("action" = String, Path)),
    responses((status = 200, body = Rollout), (status = 400, body = Error), (status = 404, body = Error),
        (status = 409, body = Error), (status = 503, body = Error)))]
fn rollout_action() {}

/// fleet's discovery document (Google discovery format).
#[utoipa::path(get, path = "/fleet/v1/discovery", responses((status = 200, body = Object)))]
fn discovery() {}

/// This document.
#[utoipa::path(get, path = "/fleet/v1/openapi.json", responses((status = 200, body = Object)))]
fn openapi_json() {}

/// Which engine leads and which units it could not place (fleet-rs addition).
#[utoipa::path(get, path = "/engine/status", responses((status = 200, body = Object)))]
fn engine_status() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleet API",
        description = "fleet's /fleet/v1 REST API, compatible with CoreOS fleet, plus fleet-rs additions."
    ),
    paths(
        list_units,
        create_units,
        units_batch_get,
        units_batch_update,
        units_batch_delete,
        units_wait,
        get_unit,
        put_unit,
        delete_unit,
        move_unit,
        forget_move,
        unit_status,
        unit_journal,
        list_states,
        stream_states,
        get_state,
        list_machines,
        patch_machines,
        drain_machine,
        undrain_machine,
        list_events,
        stream_events,
        create_join_token,
        list_join_tokens,
        revoke_join_token,
        join_ca,
        join,
        create_rollout,
        list_rollouts,
        get_rollout,
        rollout_action,
        discovery,
        openapi_json,
        engine_status
    ),
    components(schemas(
        Unit,
        CreateUnits,
        Created,
        UnitOption,
        UnitPage,
        UnitState,
        UnitStatePage,
        StateStreamHead,
        Machine,
        MachinePage,
        MetadataOp,
        Error,
        ErrorDetail,
        MoveRequest,
        MoveAccepted,
        DrainAccepted,
        AgentStatus,
        UnitStatuses,
        Names,
        Found,
        UnitChange,
        UnitChanges,
        Changed,
        Destroyed,
        Until,
        WaitRequest,
        WaitEvent,
        UnitError,
        Event,
        EventPage,
        JoinTokenRequest,
        JoinTokenInfo,
        JoinTokenCreated,
        JoinTokenPage,
        JoinRequest,
        Joined,
        RolloutRequest,
        Rollout,
        RolloutInstance,
        RolloutList
    ))
)]
pub struct ApiDoc;

/// Every operation needs a caller: a bearer token or a client certificate of the cluster CA (or
/// the unix socket, which OpenAPI cannot describe); each may answer 401, 403 and 413.
fn secure(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme("bearerToken", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    components.add_security_scheme(
        "clientCertificate",
        SecurityScheme::MutualTls {
            description: Some("A client certificate signed by the cluster CA; its common name maps to a role.".into()),
            extensions: None,
        },
    );
    doc.security = Some(vec![
        SecurityRequirement::new("bearerToken", Vec::<String>::new()),
        SecurityRequirement::new("clientCertificate", Vec::<String>::new()),
    ]);
    let error = |what: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(what)
                .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build())
                .build(),
        )
    };
    for item in doc.paths.paths.values_mut() {
        let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
        for op in ops.into_iter().flatten() {
            let r = &mut op.responses.responses;
            r.entry("401".into()).or_insert_with(|| error("No credentials, or unknown ones"));
            r.entry("403".into()).or_insert_with(|| error("The caller's role does not allow this"));
            if op.request_body.is_some() {
                r.entry("413".into()).or_insert_with(|| error("Request body too large"));
            }
        }
    }
}

/// The document as served, pretty-printed with a trailing newline (the checked-in form).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = "v1".into();
    secure(&mut doc);
    let mut text = doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn checked_in_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let generated = super::document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).expect("write docs/openapi.json");
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json is stale: run UPDATE_OPENAPI=1 cargo test -p fleet-engine openapi"
        );
    }
}
