//! `/v1/users`: who may call the API. Managed with `users:admin`.

use drover_domain::kinds::Kind;

super::kind_routes::kind_routes!(
    Kind::User,
    UserSpec,
    CreateUser,
    tag = "users",
    collection = "/v1/users",
    item = "/v1/users/{id}",
    transitions = "/v1/users/{id}/transitions",
    ids = ["create_user", "list_users", "get_user", "patch_user", "delete_user", "request_user_transition"],
    permissions = ["users:admin", "users:admin", "users:admin", "users:admin", "users:admin"]
);
