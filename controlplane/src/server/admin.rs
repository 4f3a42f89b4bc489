//! The administration service, served only on the local Unix socket.

use std::sync::Arc;

use crate::grpc::admin_service_server::AdminService;
use tonic::{Request, Response, Status};
use wirefence_proto::v1::{
    ApplyPolicyReply, ApplyPolicyRequest, ApproveNodeReply, ApproveNodeRequest, CreateEnrollmentKeyReply,
    CreateEnrollmentKeyRequest, DryRunPolicyReply, DryRunPolicyRequest, GetNodeRequest, GetPolicyReply,
    GetPolicyRequest, ListEnrollmentKeysReply, ListEnrollmentKeysRequest, ListFlowsReply, ListFlowsRequest,
    ListNodesReply, ListNodesRequest, Node, ReenrollNodeReply, ReenrollNodeRequest, ReleaseNameReply,
    ReleaseNameRequest, RemoveNodeReply, RemoveNodeRequest, RequestCredentialRotationReply,
    RequestCredentialRotationRequest, RevokeEnrollmentKeyReply, RevokeEnrollmentKeyRequest, RuleUsageReply,
    RuleUsageRequest, SetNodeReply, SetNodeRequest, SetNodeRoutesReply, SetNodeRoutesRequest,
};

use crate::registry::keys::KeySpec;
use crate::registry::routes::wire_prefixes;
use crate::registry::{detached, Registry};

#[derive(Clone)]
pub struct AdminSvc {
    pub registry: Arc<Registry>,
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn apply_policy(&self, request: Request<ApplyPolicyRequest>) -> Result<Response<ApplyPolicyReply>, Status> {
        let r = request.into_inner();
        let file = if r.file_name.is_empty() { "policy".to_owned() } else { r.file_name };
        let registry = self.registry.clone();
        let applied = detached(async move { registry.apply_policy(&file, &r.source).await }).await?;
        Ok(Response::new(ApplyPolicyReply {
            version: applied.version,
            rules: count(applied.rules),
            tests_passed: count(applied.tests_passed),
            unmatched_selectors: applied.unmatched,
        }))
    }

    async fn get_policy(&self, _: Request<GetPolicyRequest>) -> Result<Response<GetPolicyReply>, Status> {
        let registry = self.registry.clone();
        let p = detached(async move { registry.policy_file().await }).await?;
        Ok(Response::new(GetPolicyReply { file_name: p.file_name, source: p.source, version: p.version }))
    }

    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesReply>, Status> {
        let include_removed = request.into_inner().include_removed;
        let registry = self.registry.clone();
        Ok(Response::new(ListNodesReply {
            nodes: detached(async move { registry.list_nodes(include_removed).await }).await?,
        }))
    }

    async fn dry_run_policy(
        &self,
        request: Request<DryRunPolicyRequest>,
    ) -> Result<Response<DryRunPolicyReply>, Status> {
        let r = request.into_inner();
        let file = if r.file_name.is_empty() { "policy".to_owned() } else { r.file_name.clone() };
        let registry = self.registry.clone();
        Ok(Response::new(detached(async move { registry.dry_run_policy(&file, &r).await }).await?))
    }

    async fn get_rule_usage(&self, request: Request<RuleUsageRequest>) -> Result<Response<RuleUsageReply>, Status> {
        let (registry, req) = (self.registry.clone(), request.into_inner());
        Ok(Response::new(detached(async move { registry.rule_usage(&req).await }).await?))
    }

    async fn list_flows(&self, request: Request<ListFlowsRequest>) -> Result<Response<ListFlowsReply>, Status> {
        let (registry, req) = (self.registry.clone(), request.into_inner());
        Ok(Response::new(detached(async move { registry.list_flows(req).await }).await?))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let (registry, node) = (self.registry.clone(), request.into_inner().node);
        Ok(Response::new(detached(async move { registry.get_node(&node).await }).await?))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeReply>, Status> {
        let (registry, node) = (self.registry.clone(), request.into_inner().node);
        let version = detached(async move { registry.remove_node(&node).await }).await?;
        Ok(Response::new(RemoveNodeReply { version }))
    }

    async fn create_enrollment_key(
        &self,
        request: Request<CreateEnrollmentKeyRequest>,
    ) -> Result<Response<CreateEnrollmentKeyReply>, Status> {
        let spec = KeySpec::from_request(request.into_inner())?;
        let registry = self.registry.clone();
        let k = detached(async move { registry.create_enrollment_key(spec).await }).await?;
        Ok(Response::new(CreateEnrollmentKeyReply { key_id: k.key_id, key: k.key, expires_unix: k.expires_unix }))
    }

    async fn list_enrollment_keys(
        &self,
        _: Request<ListEnrollmentKeysRequest>,
    ) -> Result<Response<ListEnrollmentKeysReply>, Status> {
        let registry = self.registry.clone();
        Ok(Response::new(ListEnrollmentKeysReply {
            keys: detached(async move { registry.list_enrollment_keys().await }).await?,
        }))
    }

    async fn revoke_enrollment_key(
        &self,
        request: Request<RevokeEnrollmentKeyRequest>,
    ) -> Result<Response<RevokeEnrollmentKeyReply>, Status> {
        let (registry, id) = (self.registry.clone(), request.into_inner().key_id);
        detached(async move { registry.revoke_enrollment_key(&id).await }).await?;
        Ok(Response::new(RevokeEnrollmentKeyReply {}))
    }

    async fn approve_node(&self, request: Request<ApproveNodeRequest>) -> Result<Response<ApproveNodeReply>, Status> {
        let (registry, node) = (self.registry.clone(), request.into_inner().node);
        let version = detached(async move { registry.approve_node(&node).await }).await?;
        Ok(Response::new(ApproveNodeReply { version }))
    }

    async fn release_name(&self, request: Request<ReleaseNameRequest>) -> Result<Response<ReleaseNameReply>, Status> {
        let (registry, name) = (self.registry.clone(), request.into_inner().hostname);
        detached(async move { registry.release_name(&name).await }).await?;
        Ok(Response::new(ReleaseNameReply {}))
    }

    async fn request_credential_rotation(
        &self,
        request: Request<RequestCredentialRotationRequest>,
    ) -> Result<Response<RequestCredentialRotationReply>, Status> {
        let (registry, node) = (self.registry.clone(), request.into_inner().node);
        detached(async move { registry.request_rotation(&node).await }).await?;
        Ok(Response::new(RequestCredentialRotationReply {}))
    }

    async fn set_node_routes(
        &self,
        request: Request<SetNodeRoutesRequest>,
    ) -> Result<Response<SetNodeRoutesReply>, Status> {
        let r = request.into_inner();
        let grant = wire_prefixes("grant", &r.grant)?;
        let revoke = wire_prefixes("revoke", &r.revoke)?;
        let registry = self.registry.clone();
        let (version, node) = detached(async move { registry.set_node_routes(&r.node, &grant, &revoke).await }).await?;
        Ok(Response::new(SetNodeRoutesReply { version, node: Some(node) }))
    }

    async fn reenroll_node(
        &self,
        request: Request<ReenrollNodeRequest>,
    ) -> Result<Response<ReenrollNodeReply>, Status> {
        let registry = self.registry.clone();
        let r = request.into_inner();
        let (key, node_id) = detached(async move { registry.reenroll_key(&r.node, r.expires_in_secs).await }).await?;
        Ok(Response::new(ReenrollNodeReply {
            key_id: key.key_id,
            key: key.key,
            expires_unix: key.expires_unix,
            node_id,
        }))
    }

    async fn set_node(&self, request: Request<SetNodeRequest>) -> Result<Response<SetNodeReply>, Status> {
        let r = request.into_inner();
        let registry = self.registry.clone();
        let tags = r.tags.map(|t| t.tags);
        let (version, node) = detached(async move { registry.set_node(&r.node, tags, r.hostname).await }).await?;
        Ok(Response::new(SetNodeReply { version, node: Some(node) }))
    }
}
