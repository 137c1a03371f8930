//! Renders a cluster's CloudFormation stack from its spec: pure functions,
//! so the exact template and parameters can be unit-tested and previewed
//! (`GET /v1/clusters/{id}/template`) before anything is sent.
//!
//! The template has a launch template (image, instance type, key pair,
//! security groups, cloud-config user-data) and an auto-scaling group whose
//! min, max and desired capacity are all `Count`, in the spec's subnets,
//! tagged (and propagating its tags to instances) with the drover resource.
//! Every parameter is passed explicitly on create and update: nothing relies
//! on defaults or `UsePreviousValue`. A scale changes `Count` only.

use std::collections::BTreeMap;

use drover_domain::kinds::cluster::Spec;
use drover_domain::model::Resource;
use serde_json::{json, Map, Value};

use super::{TAG_CLUSTER, TAG_RESOURCE};

/// What a worker group learns from its leader's stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub name: String,
    pub stack_name: String,
    /// The leader's auto-scaling group (its stack output).
    pub auto_scaling_group: String,
    /// Private IPs of the leader's instances.
    pub endpoints: Vec<String>,
}

/// The settings a cluster's instances get (resolved global → environment
/// → cluster): the non-secret ones written into the cloud-config, the
/// secret ones only named, by the Parameter Store path the instances read
/// them from at boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    pub env: BTreeMap<String, String>,
    /// Keys of the secret settings (their values are in Parameter Store).
    pub secret_keys: Vec<String>,
}

/// Where a cluster's secret settings live in SSM Parameter Store: one
/// `SecureString` per key under it.
pub fn parameter_path(cluster: &Resource) -> String {
    format!("/drover/clusters/{}/", cluster.id)
}

/// A value for a systemd environment file (`EnvironmentFile=`):
/// double-quoted, with `\`, `"` and newlines escaped (systemd reads them
/// back, and expands no `$` in an environment file).
pub(super) fn systemd_value(value: &str) -> String {
    let mut v = String::with_capacity(value.len() + 2);
    v.push('"');
    for ch in value.chars() {
        match ch {
            '\\' => v.push_str("\\\\"),
            '"' => v.push_str("\\\""),
            '\n' => v.push_str("\\n"),
            '\r' => v.push_str("\\r"),
            c => v.push(c),
        }
    }
    v.push('"');
    v
}

/// A value as one line of a systemd environment file ([`systemd_value`]),
/// with `${` escaped for `Fn::Sub`.
fn env_line(key: &str, value: &str) -> String {
    // `Fn::Sub` reads `${…}`; `${!` is its literal `${`.
    format!("{key}={}", systemd_value(value).replace("${", "${!"))
}

/// A stack as drover would send it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub stack_name: String,
    pub template: Value,
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub termination_protection: bool,
}

impl Rendered {
    pub fn template_body(&self) -> String {
        serde_json::to_string_pretty(&self.template).expect("template serialises")
    }

    /// The preview `GET /v1/clusters/{id}/template` shows.
    pub fn to_json(&self) -> Value {
        json!({
            "stack_name": self.stack_name,
            "template": self.template,
            "parameters": self.parameters,
            "tags": self.tags,
            "termination_protection": self.termination_protection,
        })
    }
}

/// The stack's name: the cluster's name and a piece of its id, so that two
/// drover installations (or a deleted and re-made cluster) never share one.
pub fn stack_name(cluster: &Resource) -> String {
    let id = cluster.id.simple().to_string();
    format!("drover-{}-{}", cluster.name, &id[id.len() - 12..])
}

/// `key=value,…` as given, or `cluster=<name>` when the spec has none.
pub fn role_metadata(cluster: &Resource, spec: &Spec) -> String {
    spec.machine_metadata(&cluster.name)
}

fn param(kind: &str, description: &str) -> Value {
    json!({"Type": kind, "Description": description})
}

/// The cloud-config each instance boots with. `${…}` are the stack's
/// parameters, substituted by CloudFormation (`Fn::Sub`). A worker group's
/// instances join the leader's fleet the way CoreOS clusters on AWS did: a
/// local etcd in proxy mode whose peers are the leader's instances, and
/// fleet talking to that proxy.
fn cloud_config(worker: bool, delivery: &Delivery) -> String {
    let mut s = String::from(
        "#cloud-config\n\
         # Rendered by drover for cluster ${ClusterName} (${ResourceId}).\n\
         coreos:\n",
    );
    if worker {
        s.push_str(
            "  etcd2:\n    proxy: \"on\"\n    initial-cluster: \"${LeaderEtcdPeers}\"\n\
             \x20   listen-client-urls: \"http://127.0.0.1:2379\"\n",
        );
    }
    s.push_str("  fleet:\n    metadata: \"${RoleMetadata}\"\n");
    if worker {
        s.push_str("    etcd_servers: \"http://127.0.0.1:2379\"\n");
    }
    if !delivery.secret_keys.is_empty() {
        // Secret settings never travel in user-data (instance metadata
        // shows it to anything on the instance): the instance reads them
        // from Parameter Store at boot, with its instance profile, into a
        // file only root reads. Units read both env files.
        s.push_str(
            "  units:\n    - name: drover-secrets.service\n      command: start\n      content: |\n\
             \x20       [Unit]\n\
             \x20       Description=drover: the cluster's secret settings from SSM Parameter Store\n\
             \x20       Wants=network-online.target docker.service\n\
             \x20       After=network-online.target docker.service\n\
             \x20       [Service]\n\
             \x20       Type=oneshot\n\
             \x20       RemainAfterExit=yes\n\
             \x20       UMask=0077\n\
             \x20       ExecStart=/bin/sh -c 'for try in 1 2 3 4 5 6 7 8 9 10; do \\\n\
             \x20         docker run --rm amazon/aws-cli ssm get-parameters-by-path \\\n\
             \x20           --region ${AWS::Region} --path ${SecretsPath} --with-decryption \\\n\
             \x20           --query \"Parameters[].[Name,Value]\" --output text > /etc/drover/secrets.raw \\\n\
             \x20         && sed -e \"s|^${SecretsPath}||\" -e \"s|\\t|=|\" /etc/drover/secrets.raw > /etc/drover/secrets.env.new \\\n\
             \x20         && mv /etc/drover/secrets.env.new /etc/drover/secrets.env && rm -f /etc/drover/secrets.raw \\\n\
             \x20         && exit 0; sleep 6; done; exit 1'\n",
        );
    }
    s.push_str(
        "write_files:\n  - path: /etc/drover/cluster.env\n    permissions: \"0644\"\n    content: |\n\
         \x20     DROVER_CLUSTER=${ClusterName}\n\
         \x20     DROVER_RESOURCE=${ResourceId}\n\
         \x20     DROVER_ROLE_METADATA=${RoleMetadata}\n",
    );
    if worker {
        s.push_str(
            "      DROVER_LEADER=${LeaderName}\n\
             \x20     DROVER_LEADER_ENDPOINTS=${LeaderEndpoints}\n",
        );
    }
    // The non-secret settings, for the units (`EnvironmentFile=`): only
    // root reads them.
    s.push_str("  - path: /etc/drover/settings.env\n    permissions: \"0600\"\n    content: |\n");
    if delivery.env.is_empty() {
        s.push_str("      # no settings\n");
    }
    for (k, v) in &delivery.env {
        s.push_str(&format!("      {}\n", env_line(k, v)));
    }
    if !delivery.secret_keys.is_empty() {
        s.push_str(&format!(
            "  - path: /etc/drover/secrets.keys\n    permissions: \"0644\"\n    content: |\n      # In Parameter Store under ${{SecretsPath}}, not here:\n{}",
            delivery.secret_keys.iter().map(|k| format!("      {k}\n")).collect::<String>()
        ));
    }
    s
}

/// `leader-0=http://10.0.0.4:2380,…`: the leader's instances as etcd peers.
fn etcd_peers(endpoints: &[String]) -> String {
    let peers: Vec<String> =
        endpoints.iter().enumerate().map(|(i, ip)| format!("leader-{i}=http://{ip}:2380")).collect();
    peers.join(",")
}

/// Renders the stack for `count` instances of `ami`.
pub fn render(
    cluster: &Resource,
    spec: &Spec,
    ami: &str,
    count: u32,
    leader: Option<&Leader>,
    delivery: &Delivery,
) -> Rendered {
    let mut parameters = BTreeMap::new();
    let mut declared = Map::new();
    let mut add = |key: &str, kind: &str, desc: &str, value: String| {
        declared.insert(key.to_string(), param(kind, desc));
        parameters.insert(key.to_string(), value);
    };
    add("ClusterName", "String", "The drover cluster", cluster.name.clone());
    add("ResourceId", "String", "The drover resource id", cluster.id.to_string());
    add("ImageId", "AWS::EC2::Image::Id", "The AMI the instances start from", ami.to_string());
    add("InstanceType", "String", "EC2 instance type", spec.instance_type.clone().unwrap_or_default());
    add("Count", "Number", "Instances: min, max and desired capacity", count.to_string());
    add(
        "HealthCheckGracePeriod",
        "Number",
        "Seconds a new instance has before the group's health checks count (start_timeout_secs)",
        spec.start_timeout_secs.to_string(),
    );
    add("Subnets", "List<AWS::EC2::Subnet::Id>", "Subnets of the auto-scaling group", spec.subnets.join(","));
    add("RoleMetadata", "String", "Role metadata for the instances (key=value,…)", role_metadata(cluster, spec));
    if let Some(key) = &spec.key_name {
        add("KeyName", "AWS::EC2::KeyPair::KeyName", "EC2 key pair", key.clone());
    }
    if let Some(profile) = &spec.instance_profile {
        add("InstanceProfile", "String", "IAM instance profile of the instances", profile.clone());
    }
    if !spec.security_groups.is_empty() {
        add(
            "SecurityGroups",
            "List<AWS::EC2::SecurityGroup::Id>",
            "Security groups of the instances",
            spec.security_groups.join(","),
        );
    }
    if !delivery.secret_keys.is_empty() {
        add("SecretsPath", "String", "Where the secret settings are in SSM Parameter Store", parameter_path(cluster));
    }
    if let Some(l) = leader {
        add("LeaderName", "String", "The leader cluster joined", l.name.clone());
        add("LeaderEndpoints", "String", "Private IPs of the leader's instances", l.endpoints.join(","));
        add("LeaderEtcdPeers", "String", "The leader's instances as etcd peers (name=URL,…)", etcd_peers(&l.endpoints));
    }

    let mut lt_data = Map::new();
    lt_data.insert("ImageId".into(), json!({"Ref": "ImageId"}));
    lt_data.insert("InstanceType".into(), json!({"Ref": "InstanceType"}));
    if spec.key_name.is_some() {
        lt_data.insert("KeyName".into(), json!({"Ref": "KeyName"}));
    }
    if !spec.security_groups.is_empty() {
        lt_data.insert("SecurityGroupIds".into(), json!({"Ref": "SecurityGroups"}));
    }
    if spec.instance_profile.is_some() {
        lt_data.insert("IamInstanceProfile".into(), json!({"Name": {"Ref": "InstanceProfile"}}));
    }
    // `Fn::Base64` of `Fn::Sub`: the other nesting upsets some
    // implementations (moto answers 500).
    lt_data.insert("UserData".into(), json!({"Fn::Base64": {"Fn::Sub": cloud_config(leader.is_some(), delivery)}}));

    let tags = stack_tags(cluster, spec);
    let asg_tags: Vec<Value> = tags
        .iter()
        .map(|(k, v)| json!({"Key": k, "Value": v, "PropagateAtLaunch": true}))
        .chain(std::iter::once(json!({"Key": "Name", "Value": {"Ref": "ClusterName"}, "PropagateAtLaunch": true})))
        .collect();

    let mut outputs = json!({
        "ClusterName": {"Value": {"Ref": "ClusterName"}},
        "AutoScalingGroupName": {"Value": {"Ref": "AutoScalingGroup"}},
        "LaunchTemplateId": {"Value": {"Ref": "LaunchTemplate"}},
        "RoleMetadata": {"Value": {"Ref": "RoleMetadata"}},
    });
    if leader.is_some() {
        outputs["LeaderName"] = json!({"Value": {"Ref": "LeaderName"}});
    }

    let template = json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": format!("drover cluster {} (rendered by drover; do not edit by hand)", cluster.name),
        "Parameters": declared,
        "Resources": {
            "LaunchTemplate": {
                "Type": "AWS::EC2::LaunchTemplate",
                "Properties": {"LaunchTemplateData": lt_data},
            },
            "AutoScalingGroup": {
                "Type": "AWS::AutoScaling::AutoScalingGroup",
                "Properties": {
                    "LaunchTemplate": {
                        "LaunchTemplateId": {"Ref": "LaunchTemplate"},
                        "Version": {"Fn::GetAtt": ["LaunchTemplate", "LatestVersionNumber"]},
                    },
                    "MinSize": {"Ref": "Count"},
                    "MaxSize": {"Ref": "Count"},
                    "DesiredCapacity": {"Ref": "Count"},
                    // EC2 status checks: without a load balancer the group
                    // has no other check (a router's target group brings
                    // the cluster's HTTP/TCP check; see the routers issue).
                    "HealthCheckType": "EC2",
                    "HealthCheckGracePeriod": {"Ref": "HealthCheckGracePeriod"},
                    "VPCZoneIdentifier": {"Ref": "Subnets"},
                    "Tags": asg_tags,
                },
            },
        },
        "Outputs": outputs,
    });
    Rendered {
        stack_name: stack_name(cluster),
        template,
        parameters,
        tags,
        termination_protection: spec.termination_protection,
    }
}

/// Tags of the stack (CloudFormation passes them to what it makes) and of
/// every instance: the spec's, plus drover's own.
pub fn stack_tags(cluster: &Resource, spec: &Spec) -> BTreeMap<String, String> {
    let mut tags = spec.tags.clone();
    tags.insert(TAG_RESOURCE.into(), cluster.id.to_string());
    tags.insert(TAG_CLUSTER.into(), cluster.name.clone());
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, spec: Value) -> (Resource, Spec) {
        let s = Spec::from_value(&spec).unwrap();
        let r = Resource {
            id: uuid::Uuid::parse_str("0190d5e4-7b6c-7a3e-8c1b-2f4a5e6d7c8b").unwrap(),
            kind: drover_domain::kinds::cluster::KIND,
            name: name.into(),
            state: "pending".into(),
            spec,
            version: 1,
            spec_version: 1,
            applied_version: None,
            applied_spec: None,
            outputs: json!({}),
            observed: None,
            drift: None,
            created_by: "test".into(),
            updated_by: "test".into(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        (r, s)
    }

    fn spec() -> Value {
        json!({"provider": "aws", "image": "base", "count": 3, "instance_type": "r3.large",
            "subnets": ["subnet-0123abcd", "subnet-4567ef01"], "security_groups": ["sg-0123abcd"],
            "key_name": "ops", "tags": {"team": "web"}, "role_metadata": "role=worker,instancetype=r3",
            "instance_profile": "drover-node"})
    }

    #[test]
    fn parameters_carry_the_spec() {
        let (r, s) = cluster("workers", spec());
        let out = render(&r, &s, "ami-0123abcd", 3, None, &Delivery::default());
        assert_eq!(out.stack_name, "drover-workers-2f4a5e6d7c8b");
        let p = &out.parameters;
        assert_eq!(p["ImageId"], "ami-0123abcd");
        assert_eq!(p["InstanceType"], "r3.large");
        assert_eq!(p["Count"], "3");
        assert_eq!(p["Subnets"], "subnet-0123abcd,subnet-4567ef01");
        assert_eq!(p["SecurityGroups"], "sg-0123abcd");
        assert_eq!(p["KeyName"], "ops");
        assert_eq!(p["RoleMetadata"], "role=worker,instancetype=r3");
        assert!(!p.contains_key("LeaderEndpoints"));
        // Every parameter the template declares is passed, and no other.
        let declared: Vec<_> = out.template["Parameters"].as_object().unwrap().keys().cloned().collect();
        let passed: Vec<_> = p.keys().cloned().collect();
        assert_eq!(declared, passed);
        let asg = &out.template["Resources"]["AutoScalingGroup"]["Properties"];
        for k in ["MinSize", "MaxSize", "DesiredCapacity"] {
            assert_eq!(asg[k], json!({"Ref": "Count"}), "{k}");
        }
        let lt = &out.template["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"];
        assert_eq!(lt["KeyName"], json!({"Ref": "KeyName"}));
        assert_eq!(lt["SecurityGroupIds"], json!({"Ref": "SecurityGroups"}));
        assert_eq!(lt["IamInstanceProfile"], json!({"Name": {"Ref": "InstanceProfile"}}));
        assert_eq!(p["InstanceProfile"], "drover-node");
    }

    /// CloudFormation checks that an AMI, a key pair, subnets and security
    /// groups exist before it creates anything, when the parameters say
    /// what they are.
    #[test]
    fn parameters_are_typed_for_cloudformation_to_check() {
        let (r, s) = cluster("workers", spec());
        let out = render(&r, &s, "ami-0123abcd", 3, None, &Delivery::default());
        let types: BTreeMap<&str, &str> = out.template["Parameters"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v["Type"].as_str().unwrap()))
            .collect();
        assert_eq!(types["ImageId"], "AWS::EC2::Image::Id");
        assert_eq!(types["KeyName"], "AWS::EC2::KeyPair::KeyName");
        assert_eq!(types["Subnets"], "List<AWS::EC2::Subnet::Id>");
        assert_eq!(types["SecurityGroups"], "List<AWS::EC2::SecurityGroup::Id>");
        assert_eq!(types["Count"], "Number");
        for free in ["ClusterName", "ResourceId", "InstanceType", "RoleMetadata"] {
            assert_eq!(types[free], "String", "{free}");
        }
    }

    #[test]
    fn tags_hold_the_resource_and_the_specs_tags() {
        let (r, s) = cluster("workers", spec());
        let out = render(&r, &s, "ami-0123abcd", 3, None, &Delivery::default());
        assert_eq!(out.tags["team"], "web");
        assert_eq!(out.tags[TAG_RESOURCE], r.id.to_string());
        assert_eq!(out.tags[TAG_CLUSTER], "workers");
        let asg_tags = out.template["Resources"]["AutoScalingGroup"]["Properties"]["Tags"].as_array().unwrap();
        assert!(asg_tags.contains(&json!({"Key": TAG_RESOURCE, "Value": r.id.to_string(), "PropagateAtLaunch": true})));
        assert!(asg_tags.contains(&json!({"Key": "team", "Value": "web", "PropagateAtLaunch": true})));
    }

    #[test]
    fn user_data_carries_role_metadata_and_leader_endpoints() {
        let (r, s) = cluster("workers", spec());
        let leader = Leader {
            name: "core".into(),
            stack_name: "drover-core-x".into(),
            auto_scaling_group: "asg-1".into(),
            endpoints: vec!["10.0.0.4".into(), "10.0.0.5".into()],
        };
        let out = render(&r, &s, "ami-0123abcd", 2, Some(&leader), &Delivery::default());
        assert_eq!(out.parameters["LeaderEndpoints"], "10.0.0.4,10.0.0.5");
        assert_eq!(out.parameters["LeaderName"], "core");
        let ud = &out.template["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"];
        let text = ud["Fn::Base64"]["Fn::Sub"].as_str().unwrap();
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        assert!(text.contains("metadata: \"${RoleMetadata}\""), "{text}");
        assert!(text.contains("DROVER_LEADER_ENDPOINTS=${LeaderEndpoints}"), "{text}");
        // The endpoints are used: an etcd proxy to the leader, which fleet talks to.
        assert_eq!(out.parameters["LeaderEtcdPeers"], "leader-0=http://10.0.0.4:2380,leader-1=http://10.0.0.5:2380");
        assert!(text.contains("  etcd2:\n    proxy: \"on\"\n    initial-cluster: \"${LeaderEtcdPeers}\"\n"), "{text}");
        assert!(text.contains("    etcd_servers: \"http://127.0.0.1:2379\"\n"), "{text}");
        let declared = out.template["Parameters"].as_object().unwrap();
        assert!(declared.contains_key("LeaderEtcdPeers"));
        // Without a leader, no leader parameters are referenced.
        let alone = render(&r, &s, "ami-0123abcd", 2, None, &Delivery::default());
        let text = alone.template["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
            ["Fn::Base64"]["Fn::Sub"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!text.contains("Leader"), "{text}");
    }

    #[test]
    fn a_scale_changes_only_count() {
        let (r, s) = cluster("workers", spec());
        let a = render(&r, &s, "ami-0123abcd", 3, None, &Delivery::default());
        let b = render(&r, &s, "ami-0123abcd", 5, None, &Delivery::default());
        assert_eq!(a.template, b.template);
        let diff: Vec<_> =
            a.parameters.iter().filter(|(k, v)| b.parameters[*k] != **v).map(|(k, _)| k.as_str()).collect();
        assert_eq!(diff, ["Count"]);
    }

    #[test]
    fn role_metadata_defaults_to_the_cluster() {
        let mut v = spec();
        v.as_object_mut().unwrap().remove("role_metadata");
        let (r, s) = cluster("core", v);
        assert_eq!(
            render(&r, &s, "ami-0123abcd", 1, None, &Delivery::default()).parameters["RoleMetadata"],
            "cluster=core"
        );
    }

    fn user_data(out: &Rendered) -> String {
        let lt = &out.template["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"];
        lt["UserData"]["Fn::Base64"]["Fn::Sub"].as_str().unwrap().to_string()
    }

    /// Non-secret settings are in the cloud-config, in a file only root
    /// reads, quoted for systemd and escaped for `Fn::Sub`; secret ones are
    /// only named, and fetched from Parameter Store at boot.
    #[test]
    fn settings_reach_the_instances_and_secrets_stay_out_of_user_data() {
        let (r, s) = cluster("workers", spec());
        let delivery = Delivery {
            env: BTreeMap::from([
                ("LOG_LEVEL".to_string(), "debug".to_string()),
                ("GREETING".to_string(), "say \"hi\" ${USER}\\n".to_string()),
            ]),
            secret_keys: vec!["DB_PASSWORD".into()],
        };
        let out = render(&r, &s, "ami-0123abcd", 3, None, &delivery);
        let ud = user_data(&out);
        assert!(ud.contains("  - path: /etc/drover/settings.env\n    permissions: \"0600\"\n"), "{ud}");
        assert!(ud.contains("      LOG_LEVEL=\"debug\"\n"), "{ud}");
        assert!(ud.contains(r#"      GREETING="say \"hi\" ${!USER}\\n""#), "{ud}");
        assert!(ud.contains("drover-secrets.service"), "{ud}");
        assert!(ud.contains("--path ${SecretsPath} --with-decryption"), "{ud}");
        assert!(ud.contains("      DB_PASSWORD\n"), "named as kept elsewhere: {ud}");
        assert_eq!(out.parameters["SecretsPath"], "/drover/clusters/0190d5e4-7b6c-7a3e-8c1b-2f4a5e6d7c8b/");
        // Every `${…}` left is one of the stack's parameters or a pseudo one.
        let mut rest = ud.as_str();
        while let Some(i) = rest.find("${") {
            let name = &rest[i + 2..i + 2 + rest[i + 2..].find('}').unwrap()];
            assert!(
                name.starts_with('!') || name == "AWS::Region" || out.parameters.contains_key(name),
                "{name} is not a parameter"
            );
            rest = &rest[i + 2..];
        }
        // Without secrets, no fetch and no path.
        let plain = render(&r, &s, "ami-0123abcd", 3, None, &Delivery::default());
        assert!(!user_data(&plain).contains("drover-secrets"));
        assert!(!plain.parameters.contains_key("SecretsPath"));
        assert!(user_data(&plain).contains("      # no settings\n"));
    }
}
