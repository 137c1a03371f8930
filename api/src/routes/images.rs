//! `/v1/images`: machine images.

use drover_domain::kinds::Kind;

super::kind_routes::kind_routes!(
    Kind::Image,
    ImageSpec,
    CreateImage,
    tag = "images",
    collection = "/v1/images",
    item = "/v1/images/{id}",
    transitions = "/v1/images/{id}/transitions",
    ids = ["create_image", "list_images", "get_image", "patch_image", "delete_image", "request_image_transition"],
    permissions = ["image:create", "image:read", "image:update", "image:delete", "image:{action}"]
);
