//! `/v1/roles`: named sets of permissions. Managed with `users:admin`.

use drover_domain::kinds::Kind;

super::kind_routes::kind_routes!(
    Kind::Role,
    RoleSpec,
    CreateRole,
    tag = "roles",
    collection = "/v1/roles",
    item = "/v1/roles/{id}",
    transitions = "/v1/roles/{id}/transitions",
    ids = ["create_role", "list_roles", "get_role", "patch_role", "delete_role", "request_role_transition"],
    permissions = ["users:admin", "users:admin", "users:admin", "users:admin", "users:admin"]
);
