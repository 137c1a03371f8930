//! `/v1/clusters`: clusters of instances.

use drover_domain::kinds::Kind;

super::kind_routes::kind_routes!(
    Kind::Cluster,
    ClusterSpec,
    CreateCluster,
    tag = "clusters",
    collection = "/v1/clusters",
    item = "/v1/clusters/{id}",
    transitions = "/v1/clusters/{id}/transitions",
    ids = [
        "create_cluster",
        "list_clusters",
        "get_cluster",
        "patch_cluster",
        "delete_cluster",
        "request_cluster_transition"
    ],
    permissions = ["cluster:create", "cluster:read", "cluster:update", "cluster:delete", "cluster:{action}"]
);
