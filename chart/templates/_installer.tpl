{{/*
The install step of the installer DaemonSet: an init container, or a main container with debug: true.
*/}}
{{- define "nvidia-installer.installContainer" -}}
{{- $hostRoot := "/host" }}
- name: install
  {{- if .Values.allowCompilation }}
  # Runs in the Garden Linux dev image so that it can compile when the bucket has no bundle.
  image: {{ include "nvidia-installer.devImage" . }}
  imagePullPolicy: {{ .Values.compiler.devImage.pullPolicy }}
  command: ["/cmd/nvidia-installer"]
  {{- else }}
  image: {{ include "nvidia-installer.installerImage" . }}
  imagePullPolicy: {{ include "nvidia-installer.installerPullPolicy" . }}
  command: ["/usr/local/bin/nvidia-installer"]
  {{- end }}
  args:
    - install
    {{- include "nvidia-installer.commonArgs" (list . $hostRoot) | trim | nindent 4 }}
    {{- with include "nvidia-installer.bucketArgs" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    - --modules={{ join "," .Values.nvidiaInstaller.modules }}
    {{- with .Values.nvidiaInstaller.trustedKeys }}
    - --trusted-keys={{ join "," . }}
    {{- end }}
    {{- if .Values.nvidiaInstaller.allowUnsigned }}
    - --allow-unsigned
    {{- end }}
    {{- if .Values.allowCompilation }}
    - --allow-compilation
    - --driver-source={{ include "nvidia-installer.driverSource" . }}
    {{- with .Values.compiler.driverSha256 }}
    - --driver-sha256={{ . }}
    {{- end }}
    {{- with .Values.compiler.kernelHeaders }}
    - --kernel-headers={{ . }}
    {{- end }}
    - --flavor={{ .Values.compiler.flavor }}
    {{- end }}
    {{- if .Values.upgrade.enabled }}
    # With another driver loaded: stage beside it, mark the node upgrade-required and keep it; switch
    # when the upgrade controller orders it (the node's upgrade-state label, read at start).
    - --upgrade-mode=controller
    - --unload-wait={{ .Values.upgrade.unloadWait }}
    {{- end }}
  env:
    {{- include "nvidia-installer.env" . | trim | nindent 4 }}
    {{- with include "nvidia-installer.bucketEnv" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with .Values.nvidiaInstaller.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # The only privileged step: loads kernel modules and creates the device nodes on the host.
  securityContext:
    privileged: true
    runAsUser: 0
    {{- if not .Values.allowCompilation }}
    readOnlyRootFilesystem: true
    {{- end }}
  {{- with .Values.nvidiaInstaller.installResources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    # The host's root, including its /dev, /proc, /sys and /lib/modules mounts.
    - name: host-root
      mountPath: {{ $hostRoot }}
      mountPropagation: HostToContainer
    - name: tmp
      mountPath: /tmp
    {{- include "nvidia-installer.apiTokenMount" . | nindent 4 }}
    {{- if .Values.allowCompilation }}
    - name: cmd
      mountPath: /cmd
    {{- end }}
    {{- with include "nvidia-installer.s3CaMount" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with .Values.nvidiaInstaller.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
