//! The OpenAPI document: what utoipa derives from the handlers, the
//! operations of every resource kind written from the registry, and the
//! error responses every operation shares.
//!
//! **Kinds.** utoipa needs literal paths on each handler; the kinds' routes
//! are one set of handlers for every kind ([`crate::routes::resources`]),
//! so their operations are written here, per kind, from the same registry:
//! the spec's schema is the kind's own (derived from its domain type), the
//! transition body is a `oneOf` with one branch per action (`action` a
//! constant, `params` that action's schema), and the security scope is the
//! permission the handler checks, from the same declaration. The create
//! operation links to the item operations (OpenAPI `links`), so that a
//! stateful client (schemathesis) reaches them with an id that exists.
//!
//! **Shared errors.** Some errors do not come from a handler but from what
//! surrounds it: the extractors (a path, query or body that does not
//! parse), the authentication layer, the `Idempotency-Key` middleware and
//! the store behind them all. Rather than list them by hand on each
//! operation (and forget some), [`add_common_responses`] adds them to every
//! operation that can produce them, judging by what the operation declares:
//! security, path, query and header parameters, a request body. A response
//! an operation documents itself is kept as it is.

use drover_domain::kinds::{Kind, NAME_PATTERN};
use serde_json::{json, Map, Value};

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn problem(description: &str) -> Value {
    json!({"description": description, "content": {"application/problem+json": {"schema": schema_ref("Problem")}}})
}

/// `cluster` → `Cluster`, `add-instances` → `AddInstances`.
fn pascal(s: &str) -> String {
    s.split(['-', '_'])
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

/// A generic component with its `spec` (or its items) made the kind's.
fn specialise(components: &Map<String, Value>, base: &str, field: &str, to: Value) -> Value {
    let mut s = components.get(base).cloned().unwrap_or_else(|| panic!("component {base} is registered"));
    s["properties"][field] = to;
    s
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "Id or name",
        "schema": {"type": "string", "minLength": 1}})
}

/// Whether the parameter `p` is the header `name` (header names are
/// case-insensitive).
fn is_header(p: &Value, name: &str) -> bool {
    p["in"] == "header" && p["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name))
}

fn idempotency_param() -> Value {
    json!({"name": "Idempotency-Key", "in": "header", "required": false,
        "description": "Makes a retried request safe: the same key and body return the first response.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255,
            "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$"}})
}

fn security(scope: String) -> Value {
    json!([{"bearer": [scope]}])
}

/// The body of a transition request of `kind`: one branch per action.
fn transition_request(kind: Kind) -> Value {
    let branches: Vec<Value> = kind
        .actions()
        .into_iter()
        .filter_map(|a| {
            let decl = kind.action(a)?;
            let (params, required) = match decl.params.schema() {
                // Parameters that are all optional may be left out.
                Some(mut schema) if schema["required"].as_array().is_none_or(|r| r.is_empty()) => {
                    schema["type"] = json!(["object", "null"]);
                    (schema, json!(["action"]))
                }
                Some(schema) => (schema, json!(["action", "params"])),
                None => (
                    json!({"description": "This action takes no parameters.", "type": ["object", "null"],
                        "maxProperties": 0}),
                    json!(["action"]),
                ),
            };
            Some(json!({
                "title": a,
                "description": decl.description,
                "type": "object",
                "additionalProperties": false,
                "required": required,
                "properties": {
                    "action": {"const": a},
                    "params": params,
                    "reason": {"type": ["string", "null"], "maxLength": 2000,
                        "description": "Why: kept with the transition for whoever reads it later (required in protected environments)."},
                }
            }))
        })
        .collect();
    json!({"description": format!("Ask for a transition of a {kind}: one of its actions and that action's parameters."),
        "oneOf": branches})
}

/// The schema of a JSON merge patch (RFC 7396) of a spec: any of its
/// fields, each replaced by the value given, or removed by `null` unless
/// the spec requires it. Where the spec has one branch per provider
/// (`oneOf`), so does the patch (`anyOf`: a patch that touches no
/// provider's own field fits them all), each with that provider's rules
/// on its fields: a patch that mixes two providers' fields fits none. What
/// the schema cannot know is the stored spec a patch lands on: the server
/// checks the merged spec whole.
fn merge_patch_of(spec: &Value) -> Value {
    let description = "A JSON merge patch of the spec: a field given replaces it, `null` removes it (where the spec \
        allows it); the result must be a valid spec.";
    match spec["oneOf"].as_array() {
        Some(branches) => {
            let branches: Vec<Value> = branches
                .iter()
                .map(|b| {
                    let mut patch = patch_object(spec, Some(b));
                    if let Some(title) = b.get("title") {
                        patch["title"] = title.clone();
                    }
                    patch
                })
                .collect();
            json!({"type": "object", "anyOf": branches, "description": description})
        }
        None => {
            let mut patch = patch_object(spec, None);
            patch["description"] = json!(description);
            patch
        }
    }
}

/// One object of [`merge_patch_of`]: `spec`'s fields, narrowed by `branch`.
fn patch_object(spec: &Value, branch: Option<&Value>) -> Value {
    let names = |s: Option<&Value>| -> Vec<String> {
        s.and_then(|s| s["required"].as_array())
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    };
    let required: Vec<String> = names(Some(spec)).into_iter().chain(names(branch)).collect();
    let mut properties = Map::new();
    for (field, schema) in spec["properties"].as_object().into_iter().flatten() {
        let mut schema = schema.clone();
        if let Some(s) = schema.as_object_mut() {
            s.remove("default");
        }
        if let Some(narrow) = branch.and_then(|b| b["properties"].get(field)) {
            schema = json!({"allOf": [schema, narrow]});
        }
        let patch = match required.contains(field) {
            true => schema,
            false => json!({"anyOf": [schema, {"type": "null"}]}),
        };
        properties.insert(field.clone(), patch);
    }
    json!({"type": "object", "additionalProperties": false, "properties": properties})
}

fn delete_summary(kind: Kind) -> String {
    let name = kind.as_str();
    match kind.deletable_states().as_slice() {
        [done, unstarted] => format!(
            "Deletes a {name} in its final state ({done}), or still {unstarted} with no transition ever started \
             (unless live resources name it). Its transitions stay in the history."
        ),
        _ => format!(
            "Deletes a {name} in its final state ({}). Its transitions stay in the history.",
            kind.final_state()
        ),
    }
}

/// Adds every kind's schemas and operations to `doc`.
pub fn add_kinds(doc: &mut Value) {
    let base = doc["components"]["schemas"].as_object().cloned().unwrap_or_default();
    let mut schemas = Map::new();
    let mut paths = Map::new();
    let mut tags = Vec::new();
    for kind in Kind::all() {
        let p = pascal(kind.as_str());
        let (name, plural) = (kind.as_str(), kind.plural());
        let spec = format!("{p}Spec");
        let mut spec_schema = kind.spec_schema();
        if let Some(example) = kind.examples().into_iter().next() {
            spec_schema["examples"] = json!([example]);
        }
        schemas.insert(
            format!("Patch{p}"),
            json!({"type": "object", "additionalProperties": false, "required": ["spec"],
                "properties": {
                    "spec": merge_patch_of(&spec_schema),
                    "reason": {"type": ["string", "null"], "maxLength": 2000,
                        "description": "Why: kept with the spec version the change makes."}}}),
        );
        schemas.insert(spec.clone(), spec_schema);
        schemas.insert(
            format!("Create{p}"),
            json!({"type": "object", "additionalProperties": false, "required": ["name", "spec"],
                "properties": {
                    "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 63,
                        "description": format!("DNS-label name, unique among {plural}.")},
                    "spec": schema_ref(&spec),
                    "reason": {"type": ["string", "null"], "maxLength": 2000,
                        "description": "Why: kept with spec version 1."}}}),
        );
        schemas.insert(format!("{p}View"), specialise(&base, "ResourceView", "spec", schema_ref(&spec)));
        schemas.insert(format!("{p}Summary"), specialise(&base, "ResourceSummary", "spec", schema_ref(&spec)));
        schemas.insert(
            format!("{p}Page"),
            specialise(
                &base,
                "ResourcePage",
                "items",
                json!({"type": "array", "items": schema_ref(&format!("{p}Summary"))}),
            ),
        );
        schemas.insert(format!("{p}TransitionRequest"), transition_request(kind));
        tags.push(json!({"name": plural, "description": kind.description()}));

        let links = json!({
            "get": {"operationId": format!("get_{name}"), "parameters": {"id": "$response.body#/id"}},
            // A client that just created the resource holds its ETag.
            "patch": {"operationId": format!("patch_{name}"),
                "parameters": {"id": "$response.body#/id", "header.If-Match": "$response.header.ETag"}},
            "delete": {"operationId": format!("delete_{name}"), "parameters": {"id": "$response.body#/id"}},
            "transition": {"operationId": format!("request_{name}_transition"), "parameters": {"id": "$response.body#/id"}},
        });
        paths.insert(
            format!("/v1/{plural}"),
            json!({
                "post": {
                    "tags": [plural], "operationId": format!("create_{name}"),
                    "summary": format!("Creates a {name} in its initial state ({}).", kind.initial_state()),
                    "parameters": [idempotency_param()],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref(&format!("Create{p}"))}}},
                    "security": security(kind.permission("create")),
                    "responses": {
                        "201": {"description": "Created",
                            "headers": {"Location": {"description": "The new resource", "schema": {"type": "string"}},
                                "ETag": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": schema_ref(&format!("{p}View"))}},
                            "links": links},
                        "409": problem("The name is taken (`already-exists`)"),
                        "422": problem("A field is invalid, or names a resource that does not exist (`invalid-request`, `errors` names the fields)"),
                    }
                },
                "get": {
                    "tags": [plural], "operationId": format!("list_{plural}"),
                    "summary": format!("Lists {plural}, oldest first, with keyset pagination."),
                    "parameters": [
                        {"name": "limit", "in": "query", "required": false, "description": "Page size, 1-500 (default 50).",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                        {"name": "cursor", "in": "query", "required": false, "description": "`next_cursor` of the previous page.",
                            "schema": {"type": "string", "format": "uuid"}},
                        {"name": "environment", "in": "query", "required": false, "description": "Only those in this environment.",
                            "schema": {"type": "string", "pattern": NAME_PATTERN}},
                    ],
                    "security": security(kind.permission("read")),
                    "responses": {"200": {"description": "A page", "content": {"application/json": {"schema": schema_ref(&format!("{p}Page"))}}}}
                }
            }),
        );
        paths.insert(
            format!("/v1/{plural}/{{id}}"),
            json!({
                "get": {
                    "tags": [plural], "operationId": format!("get_{name}"),
                    "summary": "The resource, its active transition and what it is doing, the last five transitions, and why it is failed or stuck.",
                    "parameters": [id_param()],
                    "security": security(kind.permission("read")),
                    "responses": {"200": {"description": "As JSON or (`Accept: text/plain`) a compact table",
                        "headers": {"ETag": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": schema_ref(&format!("{p}View"))},
                            "text/plain": {"schema": {"type": "string"}}}}}
                },
                "patch": {
                    "tags": [plural], "operationId": format!("patch_{name}"),
                    "summary": "Changes the spec (JSON merge patch) while no transition is active.",
                    "parameters": [id_param(), {"name": "If-Match", "in": "header", "required": false,
                        "description": "The ETag read before (the spec version, `\"v3\"`): refuses the change if the spec changed since",
                        "schema": {"type": "string"}}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref(&format!("Patch{p}"))}}},
                    "security": security(kind.permission("update")),
                    "responses": {
                        "200": {"description": "Changed", "headers": {"ETag": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": schema_ref(&format!("{p}View"))}}},
                        "409": problem("A transition is active (`resource-busy`), or the resource is built in (`resource-locked`)"),
                        "412": problem("The spec changed since the ETag sent as `If-Match` (`precondition-failed`)"),
                        "422": problem("A field is invalid, or names a resource that does not exist (`invalid-request`, `errors` names the fields)"),
                    }
                },
                "delete": {
                    "tags": [plural], "operationId": format!("delete_{name}"),
                    "summary": delete_summary(kind),
                    "parameters": [id_param()],
                    "security": security(kind.permission("delete")),
                    "responses": {
                        "204": {"description": "Deleted"},
                        "409": problem("Not in a state it may be deleted from (`action-not-allowed`), a transition is queued (`resource-busy`), or live resources name it (`resource-in-use`)"),
                    }
                }
            }),
        );
        paths.insert(
            format!("/v1/{plural}/{{id}}/transitions"),
            json!({
                "post": {
                    "tags": [plural], "operationId": format!("request_{name}_transition"),
                    "summary": format!("Asks for a transition of a {name}; it runs in the background."),
                    "parameters": [id_param(), idempotency_param()],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref(&format!("{p}TransitionRequest"))}}},
                    "security": security(kind.permission("{action}")),
                    "responses": {
                        "202": {"description": "Queued", "headers": {"Location": {"description": "The transition", "schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": schema_ref("Transition")}}},
                        "409": problem("Busy (`resource-busy`), not allowed in this state (`action-not-allowed`, lists the allowed actions), in use by live resources (`resource-in-use`), a dependency not ready, or nothing to retry"),
                    }
                }
            }),
        );
    }
    add_versions(&mut paths);
    link_item_operations(doc, &mut paths);
    type_action_queries(doc);
    for generic in ["ResourceView", "ResourceSummary", "ResourcePage", "CreateResource"] {
        doc["components"]["schemas"].as_object_mut().expect("schemas").remove(generic);
    }
    doc["components"]["schemas"].as_object_mut().expect("schemas").extend(schemas);
    doc["paths"].as_object_mut().expect("paths").extend(paths);
    let all_tags = doc["tags"].as_array_mut().expect("tags");
    all_tags.splice(0..0, tags);
}

/// An `action` query parameter of an operation under a kind's items names
/// one of that kind's actions, unless the operation lists its own (a
/// cluster's template preview: the actions that send a template).
fn type_action_queries(doc: &mut Value) {
    for kind in Kind::all() {
        let item = format!("/v1/{}/{{id}}/", kind.plural());
        let paths = doc["paths"].as_object_mut().expect("paths");
        for (_, ops) in paths.iter_mut().filter(|(p, _)| p.starts_with(&item)) {
            let ops = ops.as_object_mut().expect("a path item");
            for (_, op) in ops.iter_mut().filter(|(m, _)| METHODS.contains(&m.as_str())) {
                for p in op.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten() {
                    // An operation that takes only some actions says which.
                    if p["in"] == "query" && p["name"] == "action" && p["schema"].get("enum").is_none() {
                        p["schema"]["enum"] = json!(kind.actions());
                    }
                }
            }
        }
    }
}

/// Every kind's spec versions: the list, one version, and a diff.
fn add_versions(paths: &mut Map<String, Value>) {
    let version_param = json!({"name": "version", "in": "path", "required": true,
        "description": "A spec version number.", "schema": {"type": "integer", "minimum": 1}});
    for kind in Kind::all() {
        let (name, plural) = (kind.as_str(), kind.plural());
        let read = security(kind.permission("read"));
        paths.insert(
            format!("/v1/{plural}/{{id}}/versions"),
            json!({"get": {
                "tags": [plural], "operationId": format!("list_{name}_versions"),
                "summary": "The spec's versions, newest first: who changed what, when and why.",
                "parameters": [id_param(),
                    {"name": "limit", "in": "query", "required": false, "description": "Page size, 1-500 (default 50).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "required": false, "description": "`next_cursor` of the previous page.",
                        "schema": {"type": "integer", "minimum": 1}}],
                "security": read,
                "responses": {"200": {"description": "A page",
                    "content": {"application/json": {"schema": schema_ref("SpecVersionPage")}}}}
            }}),
        );
        paths.insert(
            format!("/v1/{plural}/{{id}}/versions/{{version}}"),
            json!({"get": {
                "tags": [plural], "operationId": format!("get_{name}_version"),
                "summary": "One spec version.",
                "parameters": [id_param(), version_param],
                "security": read,
                "responses": {"200": {"description": "The version",
                    "content": {"application/json": {"schema": schema_ref("SpecVersionView")}}}}
            }}),
        );
        paths.insert(
            format!("/v1/{plural}/{{id}}/versions/{{version}}/diff"),
            json!({"get": {
                "tags": [plural], "operationId": format!("diff_{name}_version"),
                "summary": "How a spec version differs from another (by default, the one before it).",
                "parameters": [id_param(), version_param,
                    {"name": "from", "in": "query", "required": false,
                        "description": "The version to compare with; default: the one before (0: no spec).",
                        "schema": {"type": "integer", "minimum": 0}}],
                "security": read,
                "responses": {"200": {"description": "The diff",
                    "content": {"application/json": {"schema": schema_ref("SpecDiff")}}}}
            }}),
        );
    }
}

/// Links from each kind's create to the other operations under its items
/// (`/v1/clusters/{id}/template`, `/v1/users/{id}/tokens`, …), and from a
/// setting's write to the operations on that setting, so that a stateful
/// client reaches them with something that exists.
fn link_item_operations(doc: &mut Value, kinds: &mut Map<String, Value>) {
    // Each operation under `prefix`: its id, its path parameters, and
    // whether it takes `If-Match`.
    let operations = |paths: &Map<String, Value>, prefix: &str| -> Vec<(String, Vec<String>, bool)> {
        let mut out = Vec::new();
        for (path, item) in paths.iter().filter(|(p, _)| p.starts_with(prefix)) {
            let params: Vec<String> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .map(str::to_string)
                .collect();
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                if let Some(id) = op["operationId"].as_str() {
                    let if_match = op["parameters"].as_array().into_iter().flatten().any(|p| is_header(p, "if-match"));
                    out.push((id.to_string(), params.clone(), if_match));
                }
            }
        }
        out
    };
    let others = doc["paths"].as_object().cloned().unwrap_or_default();
    for kind in Kind::all() {
        let item = format!("/v1/{}/{{id}}/", kind.plural());
        let Some(links) = kinds
            .get_mut(&format!("/v1/{}", kind.plural()))
            .and_then(|p| p["post"]["responses"]["201"]["links"].as_object_mut())
        else {
            continue;
        };
        // What the created resource gives is its id; other parameters are generated.
        for (id, _, _) in operations(&others, &item) {
            links.insert(id.clone(), json!({"operationId": id, "parameters": {"id": "$response.body#/id"}}));
        }
    }
    if let Some(put) = doc["paths"]["/v1/settings/{scope}/{key}"]["put"]["responses"]["200"].as_object_mut() {
        let mut links = Map::new();
        for (id, params, if_match) in operations(&others, "/v1/settings/{scope}/{key}") {
            let mut values: Map<String, Value> =
                params.iter().map(|p| (p.clone(), json!(format!("$request.path.{p}")))).collect();
            if if_match {
                // The version just written, for a compare-and-set.
                values.insert("header.If-Match".into(), json!("$response.header.ETag"));
            }
            links.insert(id.clone(), json!({"operationId": id, "parameters": values}));
        }
        put.insert("links".into(), Value::Object(links));
    }
}

/// Adds the shared error responses to every operation of `doc`.
pub fn add_common_responses(doc: &mut Value) {
    for item in doc["paths"].as_object_mut().into_iter().flat_map(|p| p.values_mut()) {
        for method in METHODS {
            if let Some(op) = item.get_mut(method) {
                if method == "post" {
                    // The middleware reads the key on every POST
                    // (`crate::idempotency`), so every POST documents it, alike.
                    let params = op["parameters"].as_array_mut().map(std::mem::take).unwrap_or_default();
                    let mut params: Vec<Value> =
                        params.into_iter().filter(|p| !is_header(p, "idempotency-key")).collect();
                    params.push(idempotency_param());
                    op["parameters"] = Value::Array(params);
                }
                document(op);
            }
        }
    }
}

/// What `If-Match` accepts (`crate::routes::resources::if_match`): `*`,
/// or an ETag this API gave out, weak or strong.
const IF_MATCH_PATTERN: &str = r#"^(\*|(W/)?"v[0-9]{1,18}")$"#;

fn document(op: &mut Value) {
    for p in op.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten() {
        if p["in"] != "header" {
            continue;
        }
        // A header is absent or has a value, never JSON's null (utoipa
        // writes an `Option<String>` as `["string", "null"]`, and a
        // generator then sends the text `null`).
        if let Some(types) = p["schema"]["type"].as_array() {
            let types: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
            if let [one] = types.as_slice() {
                p["schema"]["type"] = one.clone();
            }
        }
        if is_header(p, "if-match") {
            p["schema"]["pattern"] = json!(IF_MATCH_PATTERN);
            p["schema"]["minLength"] = json!(1);
        }
    }
    let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
    let params: Vec<(String, String)> = op["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["in"].as_str().unwrap_or("").to_string(), p["name"].as_str().unwrap_or("").to_ascii_lowercase()))
        .collect();
    let has = |place: &str| params.iter().any(|(i, _)| i == place);
    let header = |name: &str| params.iter().any(|(i, n)| i == "header" && n == name);
    let (path, query, body) = (has("path"), has("query"), op.get("requestBody").is_some());
    let (idempotent, if_match) = (header("idempotency-key"), header("if-match"));

    let responses = op["responses"].as_object_mut().expect("every operation has responses");
    let mut add = |status: &str, description: &str| {
        responses.entry(status.to_string()).or_insert_with(|| problem(description));
    };
    if path || query || body || if_match {
        add(
            "400",
            "A path or query parameter, header or body that cannot be read (`invalid-path`, `invalid-query`, \
             `malformed-json`, `invalid-if-match`); `errors` names it",
        );
    }
    if secured {
        add("401", "No valid bearer token (`unauthenticated`)");
        add("403", "The token's roles do not grant the permission this operation needs (`forbidden`)");
    }
    if path {
        add("404", "Not found");
    }
    if idempotent {
        add("409", "A request with this Idempotency-Key is still in progress (`idempotency-key-in-progress`)");
    }
    if if_match {
        add("412", "The resource changed since the ETag in If-Match (`precondition-failed`)");
    }
    if body {
        add("413", "The body is larger than the limit (`body-too-large`)");
        add("415", "The body is not sent as `Content-Type: application/json` (`unsupported-media-type`)");
    }
    if path || query || body || idempotent {
        add(
            "422",
            "A value that is well-formed but not acceptable (`invalid-request`, with `errors` naming the fields), \
             or an Idempotency-Key reused for another request (`idempotency-key-reused`)",
        );
    }
    if secured {
        add("503", "The database did not answer (`store-unavailable`); retry shortly");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(pascal("cluster"), "Cluster");
        assert_eq!(pascal("add-instances"), "AddInstances");
    }

    /// Values to put in a field: the edges of the bounds and of the
    /// patterns the kinds check, and the wrong types.
    fn perturbations() -> Vec<Option<Value>> {
        let mut out = vec![None, Some(Value::Null)];
        for v in [
            json!(0),
            json!(1),
            json!(-1),
            json!(63),
            json!(64),
            json!(65),
            json!(3600),
            json!(3601),
            json!(86400),
            json!(86401),
            json!(""),
            json!(" "),
            json!("x y"),
            json!("web"),
            json!("Web"),
            json!("/"),
            json!("/health"),
            json!("no-slash"),
            json!("ami-0abc1234"),
            json!("ami-zz"),
            json!("subnet-0abc1234"),
            json!("t3.micro"),
            json!("a,b"),
            json!("local"),
            json!("aws"),
            json!("gce"),
            json!("role=worker,instancetype=r3"),
            json!("role worker"),
            json!("x".repeat(64)),
            json!(true),
            json!(false),
            json!([]),
            json!(["subnet-0abc1234"]),
            json!(["nope"]),
            json!(["cluster:scale"]),
            json!(["cluster:frob"]),
            json!({}),
            json!({"team": "web"}),
            json!({"drover:run": "x"}),
            json!({"type": "tcp"}),
            json!({"type": "http", "path": "x y"}),
            json!("alice@example.com"),
            json!("alice"),
        ] {
            out.push(Some(v));
        }
        out
    }

    /// The property the kinds' schemas keep: for every spec built from a
    /// kind's examples by changing one field to one of [`perturbations`],
    /// the API's schema accepts it exactly when the kind's validation does
    /// (and accepts what validation returns). So the served schema says
    /// what the API checks, and a client that follows it is not refused.
    #[test]
    fn every_kinds_schema_accepts_exactly_what_its_validation_accepts() {
        let doc = crate::app::openapi();
        let mut checked = 0;
        for kind in Kind::all() {
            let schema = &doc["components"]["schemas"][format!("{}Spec", pascal(kind.as_str()))];
            let validator = jsonschema::validator_for(schema).expect("a valid JSON Schema");
            let fields: Vec<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
            for example in kind.examples() {
                let mut candidates = vec![example.clone()];
                for field in &fields {
                    for value in perturbations() {
                        let mut c = example.clone();
                        match value {
                            None => drop(c.as_object_mut().unwrap().remove(field)),
                            Some(v) => drop(c.as_object_mut().unwrap().insert(field.clone(), v)),
                        }
                        candidates.push(c);
                    }
                }
                for c in candidates {
                    let domain = kind.validate_spec(&c);
                    assert_eq!(
                        validator.is_valid(&c),
                        domain.is_ok(),
                        "{kind}: schema and validation disagree on {c}: {:?}",
                        domain.as_ref().err()
                    );
                    if let Ok(normalised) = domain {
                        assert!(validator.is_valid(&normalised), "{kind}: {normalised}");
                        // Through the API's shape and back is the identity.
                        let create = json!({"name": "x", "spec": normalised});
                        let dto: crate::dto::CreateResource = serde_json::from_value(create).unwrap();
                        assert_eq!(kind.validate_spec(&dto.spec).unwrap(), normalised);
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    /// The same for every action's parameters.
    #[test]
    fn every_actions_params_schema_accepts_exactly_what_it_validates() {
        for kind in Kind::all() {
            for action in kind.actions() {
                let schema = kind.action(action).unwrap().params.schema();
                let Some(schema) = schema else {
                    assert!(kind.validate_params(action, &json!({})).is_ok());
                    assert!(kind.validate_params(action, &json!({"x": 1})).is_err());
                    continue;
                };
                let validator = jsonschema::validator_for(&schema).unwrap();
                let fields: Vec<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
                for field in fields {
                    for value in perturbations().into_iter().flatten() {
                        let p = json!({ field.clone(): value });
                        assert_eq!(
                            validator.is_valid(&p),
                            kind.validate_params(action, &p).is_ok(),
                            "{kind} {action}: {p}"
                        );
                    }
                }
            }
        }
    }
}
