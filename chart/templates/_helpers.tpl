{{/*
Names and labels.
*/}}
{{- define "nvidia-installer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nvidia-installer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects; "installer" keeps the plain full name. Call with (list $ "webhook"). */}}
{{- define "nvidia-installer.componentName" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $fullname := include "nvidia-installer.fullname" $root }}
{{- if eq $component "installer" }}
{{- $fullname }}
{{- else }}
{{- printf "%s-%s" ($fullname | trunc (int (sub 62 (len $component))) | trimSuffix "-") $component }}
{{- end }}
{{- end }}

{{- define "nvidia-installer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component. Call with (list $ "webhook"). */}}
{{- define "nvidia-installer.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "nvidia-installer.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of one component's objects. Call with (list $ "webhook"). */}}
{{- define "nvidia-installer.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "nvidia-installer.chart" $root }}
{{ include "nvidia-installer.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: nvidia-installer
{{- end }}

{{/*
Mode: "compiler" (allowCompilation + forceCompile) or "installer".
*/}}
{{/*
What a release cannot work without, checked when it renders rather than found in a crash loop:
the installer instance needs the driver version and a bucket; the compiler instance a bucket to
publish to.
*/}}
{{- define "nvidia-installer.required" -}}
{{- $bucket := or .Values.driverBucketSecret .Values.nvidiaInstaller.bucket }}
{{- if eq (include "nvidia-installer.mode" .) "installer" }}
{{- if not .Values.nvidiaInstaller.driverVersion }}
{{- fail "nvidiaInstaller.driverVersion is required: the NVIDIA driver version the nodes install (e.g. \"535.261.03\"), published in the bucket by the compiler instance" }}
{{- end }}
{{- if not $bucket }}
{{- fail "driverBucketSecret is required: the Secret with accessKeyId, secretAccessKey and bucket (optional region, endpoint) the driver is staged from (or set nvidiaInstaller.bucket for role-based credentials)" }}
{{- end }}
{{- if and .Values.allowCompilation .Values.nvidiaInstaller.trustedKeys (not .Values.nvidiaInstaller.allowUnsigned) }}
{{- fail "allowCompilation builds unsigned bundles on the GPU nodes, and nvidiaInstaller.trustedKeys is set: set nvidiaInstaller.allowUnsigned: true too, or publish signed bundles and drop allowCompilation" }}
{{- end }}
{{- else if and .Values.compiler.publish (not $bucket) }}
{{- fail "driverBucketSecret is required: the Secret with accessKeyId, secretAccessKey and bucket the compiler instance publishes to (or set nvidiaInstaller.bucket for role-based credentials)" }}
{{- end }}
{{- end }}

{{- define "nvidia-installer.mode" -}}
{{- if and .Values.forceCompile (not .Values.allowCompilation) }}
{{- fail "forceCompile: true compiles on the compiler instance and needs allowCompilation: true as well" }}
{{- end }}
{{- if .Values.forceCompile }}compiler{{ else }}installer{{ end }}
{{- end }}

{{/*
"true" where the installer's node guard (installer-node-guard.yaml) renders, else empty: the
installer instance with nvidiaInstaller.nodeGuard.enabled, on Kubernetes 1.30 or later. 1.30 made
ValidatingAdmissionPolicy GA (admissionregistration.k8s.io/v1) and turned on, by default, the node
name in the ServiceAccount tokens of pods that the guard checks; older clusters have neither. The
Kubernetes version decides rather than .Capabilities.APIVersions: rendered offline (`helm template`
without --api-versions) Helm lists API groups but no kinds, and the guard would be left out unseen.
*/}}
{{- define "nvidia-installer.nodeGuard" -}}
{{- if and .Values.nvidiaInstaller.nodeGuard.enabled (eq (include "nvidia-installer.mode" .) "installer") (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) }}true{{ end }}
{{- end }}

{{/*
Images.
*/}}
{{- define "nvidia-installer.imageRef" -}}
{{- $image := index . 0 }}
{{- $defaultTag := index . 1 }}
{{- $ref := printf "%s:%s" $image.repository (default $defaultTag $image.tag) }}
{{- if $image.digest }}
{{- $ref = printf "%s@%s" $ref $image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{/* The nvidia-installer image: the DaemonSets and the webhook's --installer-image use this one helper. */}}
{{- define "nvidia-installer.installerImage" -}}
{{- include "nvidia-installer.imageRef" (list .Values.nvidiaInstaller.image .Chart.AppVersion) }}
{{- end }}

{{/* Pull policy of the nvidia-installer image, also the webhook's --image-pull-policy. */}}
{{- define "nvidia-installer.installerPullPolicy" -}}
{{- .Values.nvidiaInstaller.image.pullPolicy }}
{{- end }}

{{- define "nvidia-installer.webhookImage" -}}
{{- include "nvidia-installer.imageRef" (list .Values.webhook.image .Chart.AppVersion) }}
{{- end }}

{{- define "nvidia-installer.devImage" -}}
{{- $tag := default .Values.gardenlinuxVersion .Values.compiler.devImage.tag }}
{{- if not $tag }}
{{- fail "compiling needs the Garden Linux dev image: set gardenlinuxVersion or compiler.devImage.tag" }}
{{- end }}
{{- include "nvidia-installer.imageRef" (list .Values.compiler.devImage $tag) }}
{{- end }}

{{- define "nvidia-installer.devicePluginImage" -}}
{{- include "nvidia-installer.imageRef" (list .Values.devicePlugin.image .Values.devicePlugin.image.tag) }}
{{- end }}

{{/*
Injection settings, shared by the webhook and the DaemonSets.
*/}}
{{/* The driver root on the host (host layout of the contract; not configurable). */}}
{{- define "nvidia-installer.driverRoot" -}}
/opt/nvidia-installer
{{- end }}

{{- define "nvidia-installer.mountPath" -}}
{{- .Values.injection.mountPath }}
{{- end }}

{{- define "nvidia-installer.waitTimeout" -}}
{{- .Values.injection.waitTimeout }}
{{- end }}

{{- define "nvidia-installer.gpuResources" -}}
{{- join "," .Values.injection.gpuResources }}
{{- end }}

{{/*
The installer pods' selector labels as key=value,... (sorted): the same helper renders the
installer DaemonSet's selector, so the upgrade controller's --installer-labels cannot drift from it.
*/}}
{{- define "nvidia-installer.installerPodSelector" -}}
{{- $labels := include "nvidia-installer.selectorLabels" (list . "installer") | fromYaml }}
{{- $pairs := list }}
{{- range $key := keys $labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%v" $key (get $labels $key)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* The webhook flags that describe what is injected. */}}
{{- define "nvidia-installer.injectionArgs" -}}
- --installer-image={{ include "nvidia-installer.installerImage" . }}
- --image-pull-policy={{ include "nvidia-installer.installerPullPolicy" . }}
- --driver-root={{ include "nvidia-installer.driverRoot" . }}
- --mount-path={{ include "nvidia-installer.mountPath" . }}
- --wait-timeout={{ include "nvidia-installer.waitTimeout" . }}
- --gpu-resources={{ include "nvidia-installer.gpuResources" . }}
- --set-library-path={{ .Values.injection.setLibraryPath }}
{{- end }}

{{/* CEL: is resource name `r` one of the GPU resources? */}}
{{- define "nvidia-installer.gpuResourceCEL" -}}
{{- $terms := list }}
{{- range .Values.injection.gpuResources }}
{{- if hasSuffix "*" . }}
{{- $terms = append $terms (printf "r.startsWith('%s')" (trimSuffix "*" .)) }}
{{- else }}
{{- $terms = append $terms (printf "r == '%s'" .) }}
{{- end }}
{{- end }}
{{- join " || " $terms }}
{{- end }}

{{/*
nvidia-installer command lines.
*/}}
{{- define "nvidia-installer.logLevel" -}}
{{- if .Values.debug }}debug{{ else }}{{ .Values.logLevel }}{{ end }}
{{- end }}

{{/* Flags every nvidia-installer subcommand takes. Call with (list $ "/host") or (list $ "") for no host root. */}}
{{- define "nvidia-installer.commonArgs" -}}
{{- $root := index . 0 }}
{{- $hostRoot := index . 1 }}
{{- with $hostRoot }}
- --host-root={{ . }}
{{- end }}
{{- with $root.Values.nvidiaInstaller.driverVersion }}
- --driver-version={{ . }}
{{- end }}
{{- with $root.Values.gardenlinuxVersion }}
- --gardenlinux-version={{ . }}
{{- end }}
{{- with $root.Values.nvidiaInstaller.kernelRelease }}
- --kernel-release={{ . }}
{{- end }}
- --log-format={{ $root.Values.logFormat }}
{{- end }}

{{/* Flags of the subcommands that talk to the bucket. */}}
{{- define "nvidia-installer.bucketArgs" -}}
{{- with .Values.nvidiaInstaller.bucket }}
- --bucket={{ . }}
{{- end }}
{{- with .Values.nvidiaInstaller.region }}
- --region={{ . }}
{{- end }}
{{- with .Values.nvidiaInstaller.s3Endpoint }}
- --s3-endpoint={{ . }}
{{- end }}
{{- if include "nvidia-installer.s3CaConfigMapName" . }}
- --s3-ca-file={{ include "nvidia-installer.s3CaDir" . }}/ca.crt
{{- end }}
{{- end }}

{{/* Environment of every nvidia-installer container. */}}
{{- define "nvidia-installer.env" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: RUST_LOG
  value: {{ include "nvidia-installer.logLevel" . | quote }}
{{- with .Values.nvidiaInstaller.kernelRelease }}
# For $(KERNEL_RELEASE) in arguments such as compiler.kernelHeaders.
- name: KERNEL_RELEASE
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Bucket credentials from driverBucketSecret, with the original system's keys; none for role-based credentials. */}}
{{- define "nvidia-installer.bucketEnv" -}}
{{- with .Values.driverBucketSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: accessKeyId
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: secretAccessKey
- name: NVIDIA_INSTALLER_BUCKET
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: bucket
- name: AWS_REGION
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: region
      optional: true
- name: NVIDIA_INSTALLER_S3_ENDPOINT
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: endpoint
      optional: true
{{- end }}
{{- end }}

{{/* The init container that copies nvidia-installer into /cmd for the dev image. */}}
{{- define "nvidia-installer.copyBinaryContainer" -}}
- name: copy-installer
  image: {{ include "nvidia-installer.installerImage" . }}
  imagePullPolicy: {{ include "nvidia-installer.installerPullPolicy" . }}
  command: ["cp", "/usr/local/bin/nvidia-installer", "/cmd/nvidia-installer"]
  securityContext:
    {{- include "nvidia-installer.restrictedContainerSecurityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  volumeMounts:
    - name: cmd
      mountPath: /cmd
{{- end }}

{{/*
Security contexts and scheduling.
*/}}
{{- define "nvidia-installer.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Scheduling of the node pods (installer, compiler, device plugin): nvidiaInstaller.nodeAffinity and
nvidiaInstaller.tolerations, unless the component's own values set `affinity` or `tolerations` (the
device plugin's). Call with (list $ .Values.devicePlugin) or (list $ dict); a third element, a list
of node selector requirements, is added to every required node selector term (the terms are ORed,
so a requirement holds only when every term has it), or makes the only term when there is none.
Terms with neither matchExpressions nor matchFields match no node and are left as they are.
*/}}
{{- define "nvidia-installer.nodeScheduling" -}}
{{- $root := index . 0 }}
{{- $own := index . 1 }}
{{- $also := list }}
{{- if gt (len .) 2 }}
{{- $also = index . 2 }}
{{- end }}
{{- $affinity := dict }}
{{- if $own.affinity }}
{{- $affinity = deepCopy $own.affinity }}
{{- else if $root.Values.nvidiaInstaller.nodeAffinity }}
{{- $affinity = dict "nodeAffinity" (deepCopy $root.Values.nvidiaInstaller.nodeAffinity) }}
{{- end }}
{{- if $also }}
{{- $nodeAffinity := $affinity.nodeAffinity | default dict }}
{{- $required := $nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution | default dict }}
{{- $terms := list }}
{{- range $required.nodeSelectorTerms }}
{{- if or .matchExpressions .matchFields }}
{{- $terms = append $terms (set (deepCopy .) "matchExpressions" (concat (.matchExpressions | default list) $also)) }}
{{- else }}
{{- $terms = append $terms . }}
{{- end }}
{{- end }}
{{- if not $terms }}
{{- $terms = list (dict "matchExpressions" $also) }}
{{- end }}
{{- $_ := set $required "nodeSelectorTerms" $terms }}
{{- $_ = set $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution" $required }}
{{- $_ = set $affinity "nodeAffinity" $nodeAffinity }}
{{- end }}
priorityClassName: {{ $root.Values.nvidiaInstaller.priorityClassName }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.nvidiaInstaller.tolerations $own.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A component's labels and labels from the values (podLabels, a monitor's labels), which may add
labels but not replace the chart's (the selectors depend on them). Call with
(list $ "webhook" .Values.webhook.podLabels "webhook.podLabels").
*/}}
{{- define "nvidia-installer.labelsWith" -}}
{{- $labels := include "nvidia-installer.labels" (list (index . 0) (index . 1)) | fromYaml }}
{{- $extra := index . 2 | default dict }}
{{- range $key := keys $extra | sortAlpha }}
{{- if hasKey $labels $key }}
{{- fail (printf "%s: %s is one of the chart's own labels; choose another key" (index $ 3) $key) }}
{{- end }}
{{- end }}
{{- toYaml (merge $labels $extra) }}
{{- end }}

{{/*
Annotations of the installer and compiler pods: nvidiaInstaller.podAnnotations, and the checksum of
the S3 CA bundle the chart stores, so that a changed bundle rolls the pods.
*/}}
{{- define "nvidia-installer.nodePodAnnotations" -}}
{{- $annotations := deepCopy (.Values.nvidiaInstaller.podAnnotations | default dict) }}
{{- with .Values.nvidiaInstaller.s3CaBundle }}
{{- $_ := set $annotations "checksum/s3-ca" (sha256sum .) }}
{{- end }}
{{- with $annotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
The user's extra volumes and mounts of one pod, checked against the chart's own: a volume name the
chart uses, a mount of a volume that extraVolumes does not define, a mount path where the chart
mounts something, or one under /host (the node's root as the installer sees it) fails the render.
Call with (dict "key" "nvidiaInstaller" "values" .Values.nvidiaInstaller "volumes" (list ...)
"mountPaths" (list ...)); renders nothing.
*/}}
{{- define "nvidia-installer.checkExtraVolumes" -}}
{{- $key := .key }}
{{- $extra := dict }}
{{- range .values.extraVolumes }}
{{- if has .name $.volumes }}
{{- fail (printf "%s.extraVolumes: %s is the name of one of the chart's own volumes (%s); choose another name" $key .name (join ", " $.volumes)) }}
{{- end }}
{{- if hasKey $extra .name }}
{{- fail (printf "%s.extraVolumes: %s is defined twice" $key .name) }}
{{- end }}
{{- $_ := set $extra .name true }}
{{- end }}
{{- range .values.extraVolumeMounts }}
{{- if not (hasKey $extra .name) }}
{{- fail (printf "%s.extraVolumeMounts: %s mounts volume %s, which %s.extraVolumes does not define" $key .mountPath .name $key) }}
{{- end }}
{{- $path := clean .mountPath }}
{{- if or (has $path $.mountPaths) (eq $path "/host") (hasPrefix "/host/" $path) }}
{{- fail (printf "%s.extraVolumeMounts: %s is where the chart mounts its own volumes (%s, and /host with everything under it); choose another path" $key .mountPath (join ", " $.mountPaths)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The S3 CA: nvidiaInstaller.s3CaBundle (stored in a ConfigMap of the chart) or
nvidiaInstaller.s3CaConfigMap (an existing ConfigMap with the key ca.crt). Mounted read-only into
the containers that talk to the bucket (install, modulus), which get --s3-ca-file.
*/}}
{{- define "nvidia-installer.s3CaConfigMapName" -}}
{{- if and .Values.nvidiaInstaller.s3CaBundle .Values.nvidiaInstaller.s3CaConfigMap }}
{{- fail "nvidiaInstaller.s3CaBundle and nvidiaInstaller.s3CaConfigMap are mutually exclusive: set the PEM text in s3CaBundle, or name an existing ConfigMap (key ca.crt) in s3CaConfigMap" }}
{{- end }}
{{- if .Values.nvidiaInstaller.s3CaConfigMap }}
{{- .Values.nvidiaInstaller.s3CaConfigMap }}
{{- else if .Values.nvidiaInstaller.s3CaBundle }}
{{- include "nvidia-installer.componentName" (list . "s3-ca") }}
{{- end }}
{{- end }}

{{- define "nvidia-installer.s3CaDir" -}}
/etc/nvidia-installer/s3-ca
{{- end }}

{{- define "nvidia-installer.s3CaMount" -}}
{{- if include "nvidia-installer.s3CaConfigMapName" . }}
- name: s3-ca
  mountPath: {{ include "nvidia-installer.s3CaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "nvidia-installer.s3CaVolume" -}}
{{- with include "nvidia-installer.s3CaConfigMapName" . }}
- name: s3-ca
  configMap:
    name: {{ . }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}

{{/* The webhook's objects. */}}
{{- define "nvidia-installer.webhookTlsSecret" -}}
{{- printf "%s-tls" (include "nvidia-installer.componentName" (list . "webhook")) }}
{{- end }}

{{- define "nvidia-installer.webhookConfigName" -}}
{{- include "nvidia-installer.componentName" (list . "webhook") }}
{{- end }}

{{/* The driver source the compile step builds from: compiler.driverSource, or NVIDIA's .run for the driver version. */}}
{{- define "nvidia-installer.driverSource" -}}
{{- $source := .Values.compiler.driverSource }}
{{- if not $source }}
{{- if not .Values.nvidiaInstaller.driverVersion }}
{{- fail "compiling needs nvidiaInstaller.driverVersion (or compiler.driverSource)" }}
{{- end }}
{{- $source = printf "https://us.download.nvidia.com/tesla/%s/NVIDIA-Linux-x86_64-%s.run" .Values.nvidiaInstaller.driverVersion .Values.nvidiaInstaller.driverVersion }}
{{- end }}
{{- $source }}
{{- end }}

{{/*
The service account token, mounted only into the container that talks to the API server (the pod
sets automountServiceAccountToken: false so that no other container holds it). The same contents
the kubelet would mount: a bound token, the cluster's CA and the namespace.
*/}}
{{- define "nvidia-installer.apiTokenVolume" -}}
- name: api-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end }}

{{- define "nvidia-installer.apiTokenMount" -}}
- name: api-token
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}

{{/*
Milliseconds of a duration value (e.g. 1m30s, 1.5s, 0.5h, 500ms, 250us), rounded up; computed in
nanoseconds, fractions to six digits.
*/}}
{{- define "nvidia-installer.durationMillis" -}}
{{- $nanos := 0 }}
{{- $factors := dict "h" 3600000000000 "m" 60000000000 "s" 1000000000 "ms" 1000000 "us" 1000 "ns" 1 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h)" (toString .) -1 }}
{{- $factor := get $factors (regexFind "(ns|us|ms|s|m|h)$" .) }}
{{- $nanos = add $nanos (mul (regexFind "^[0-9]+" . | atoi) $factor) }}
{{- $fraction := regexFind "\\.[0-9]+" . | trimPrefix "." | trunc 6 }}
{{- if $fraction }}
{{- $scale := printf "1%s" (repeat (len $fraction) "0") | atoi }}
{{- $nanos = add $nanos (div (mul (atoi $fraction) $factor) $scale) }}
{{- end }}
{{- end }}
{{- div (add $nanos 999999) 1000000 }}
{{- end }}
