{{/*
Names. The usual chart conventions: nameOverride replaces the chart name, fullnameOverride the
release-qualified name (truncated to 63 characters, the DNS label limit).
*/}}
{{- define "inbox-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inbox-exporter.fullname" -}}
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

{{- define "inbox-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "inbox-exporter.labels" -}}
helm.sh/chart: {{ include "inbox-exporter.chart" . }}
{{ include "inbox-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inbox-exporter
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the exporter's pods: stable across upgrades. */}}
{{- define "inbox-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inbox-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inbox-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inbox-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "inbox-exporter.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Is the inbox list sharded over a StatefulSet? */}}
{{- define "inbox-exporter.sharded" -}}
{{- if gt (int .Values.shards) 1 }}true{{ end }}
{{- end }}

{{/* The Secret or ConfigMap holding config.yaml, and how the pod mounts it. */}}
{{- define "inbox-exporter.configVolume" -}}
{{- if .Values.existingConfigSecret }}
secret:
  secretName: {{ .Values.existingConfigSecret }}
  items:
    - key: {{ .Values.configKey }}
      path: config.yaml
{{- else if .Values.existingConfigMap }}
configMap:
  name: {{ .Values.existingConfigMap }}
  items:
    - key: {{ .Values.configKey }}
      path: config.yaml
{{- else }}
configMap:
  name: {{ include "inbox-exporter.fullname" . }}
  items:
    - key: config.yaml
      path: config.yaml
{{- end }}
{{- end }}

{{/*
checksum/config: changes whenever the configuration rendered from values changes, so the pods
roll. A Secret or ConfigMap the chart does not own cannot be read at render time: its name and
key are hashed instead; roll the pods yourself after changing it (see values.yaml).
*/}}
{{- define "inbox-exporter.configChecksum" -}}
{{- if or .Values.existingConfigSecret .Values.existingConfigMap }}
{{- printf "%s/%s/%s" (.Values.existingConfigSecret | default "") (.Values.existingConfigMap | default "") .Values.configKey | sha256sum }}
{{- else }}
{{- include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Writable volumes (values: oauthTokens, history), each a block with enabled, mountPath, storage
(emptyDir or persistentVolumeClaim), emptyDir {medium, sizeLimit} and persistentVolumeClaim
{existingClaim, storageClassName, accessModes, size}. Arguments: (list $ "<values key>"
"<volume name>"). With persistentVolumeClaim storage a Deployment mounts one claim (existingClaim,
or <fullname>-<volume name> from pvc.yaml); a StatefulSet gets one claim per pod from its
volumeClaimTemplates (<volume name>-<fullname>-<i>), so the pod spec has no volume for it.
*/}}
{{- define "inbox-exporter.claimed" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $v := index $root.Values $key }}
{{- if and $v.enabled (eq $v.storage "persistentVolumeClaim") }}
{{- if and $v.persistentVolumeClaim.existingClaim (include "inbox-exporter.sharded" $root) }}
{{- fail (printf "%s.persistentVolumeClaim.existingClaim works with shards: 1 only: with shards each pod gets its own claim (leave existingClaim empty)" $key) }}
{{- end }}true
{{- end }}
{{- end }}

{{/* Does the chart create the Deployment's claim (pvc.yaml)? */}}
{{- define "inbox-exporter.claimCreated" -}}
{{- $root := index . 0 }}
{{- if and (include "inbox-exporter.claimed" .) (not (include "inbox-exporter.sharded" $root)) (not (index $root.Values (index . 1)).persistentVolumeClaim.existingClaim) }}true{{ end }}
{{- end }}

{{- define "inbox-exporter.claimName" -}}
{{- $root := index . 0 }}
{{- (index $root.Values (index . 1)).persistentVolumeClaim.existingClaim | default (printf "%s-%s" (include "inbox-exporter.fullname" $root) (index . 2)) }}
{{- end }}

{{/* A PersistentVolumeClaim's spec: the created claim and the StatefulSet's template. */}}
{{- define "inbox-exporter.claimSpec" -}}
{{- $c := (index (index . 0).Values (index . 1)).persistentVolumeClaim -}}
accessModes:
  {{- toYaml $c.accessModes | nindent 2 }}
{{- with $c.storageClassName }}
storageClassName: {{ . | quote }}
{{- end }}
resources:
  requests:
    storage: {{ $c.size | quote }}
{{- end }}

{{/* The pod's volume: an emptyDir or the Deployment's claim; none for a StatefulSet's claim. */}}
{{- define "inbox-exporter.writableVolume" -}}
{{- $root := index . 0 }}
{{- $v := index $root.Values (index . 1) }}
{{- if $v.enabled }}
{{- if eq $v.storage "emptyDir" }}
- name: {{ index . 2 }}
  emptyDir:
    {{- with $v.emptyDir.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with $v.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- else if not (include "inbox-exporter.sharded" $root) }}
- name: {{ index . 2 }}
  persistentVolumeClaim:
    claimName: {{ include "inbox-exporter.claimName" . }}
{{- end }}
{{- end }}
{{- end }}

{{/* A StatefulSet's claim template for a writable volume (when its storage is a claim). */}}
{{- define "inbox-exporter.claimTemplate" -}}
{{- $root := index . 0 }}
{{- if include "inbox-exporter.claimed" . }}
- metadata:
    name: {{ index . 2 }}
    labels:
      {{- include "inbox-exporter.selectorLabels" $root | nindent 6 }}
  spec:
    {{- include "inbox-exporter.claimSpec" . | nindent 4 }}
{{- end }}
{{- end }}

{{/* Mount paths the pod would refuse (the schema keeps them off the config volumes). */}}
{{- define "inbox-exporter.volumesValidate" -}}
{{- $h := .Values.history }}
{{- $o := .Values.oauthTokens }}
{{- if and $h.enabled $o.enabled (eq (clean $h.mountPath) (clean $o.mountPath)) }}
{{- fail (printf "history.mountPath and oauthTokens.mountPath are both %s: give each volume its own directory" $h.mountPath) }}
{{- end }}
{{- end }}

{{/*
The init container's script: copy each key of the seed Secret ($1) to the token directory ($2),
mode 0600, when the file is missing or the key changed since it was last copied (its digest is
kept in $2/.seeded/); a token the exporter rotated since is left alone. Files are replaced
atomically (a temporary file, then mv).
*/}}
{{- define "inbox-exporter.oauthSeedScript" -}}
umask 077
seed="$1" dir="$2"
mkdir -p "$dir/.seeded"
for src in "$seed"/*; do
  [ -f "$src" ] || continue
  name="${src##*/}"
  digest="$(sha256sum < "$src")"
  if [ -s "$dir/$name" ] && [ "$(cat "$dir/.seeded/$name" 2>/dev/null || true)" = "$digest" ]; then
    echo "oauth-tokens: $name: kept (the Secret's value is unchanged since it was copied)"
    continue
  fi
  cp "$src" "$dir/.$name.tmp"
  chmod 0600 "$dir/.$name.tmp"
  mv -f "$dir/.$name.tmp" "$dir/$name"
  printf '%s\n' "$digest" > "$dir/.seeded/$name"
  echo "oauth-tokens: $name: copied from the Secret"
done
{{- end }}

{{/*
The web config file (--web.config.file, values: web). It and the files it names (the TLS
certificate and key, the client CA) are mounted as ONE projected volume at webDir: the kubelet
updates such a volume atomically, every file at once, and the web config file then resolves to a
new file too, which is what makes the exporter re-read it. A renewed certificate is thus picked
up without a restart, even though only the TLS Secret changed. (Separate volumes would leave the
web config file untouched, and the exporter on the old certificate until it restarts.)
*/}}
{{- define "inbox-exporter.webDir" -}}
/etc/inbox-exporter-web
{{- end }}

{{/* Is --web.config.file passed? */}}
{{- define "inbox-exporter.webConfigFile" -}}
{{- $w := .Values.web }}
{{- if or $w.existingConfigSecret $w.config $w.tls.enabled }}true{{ end }}
{{- end }}

{{/* The Secret holding the web config file: the chart's, or web.existingConfigSecret. */}}
{{- define "inbox-exporter.webConfigSecretName" -}}
{{- .Values.web.existingConfigSecret | default (printf "%s-web-config" (include "inbox-exporter.fullname" .)) }}
{{- end }}

{{/*
Must the kubelet's probes do without HTTP? With client_auth_type RequireAndVerifyClientCert the
TLS handshake needs a client certificate, which the kubelet cannot present.
*/}}
{{- define "inbox-exporter.webClientCertRequired" -}}
{{- if and .Values.web.tls.enabled (eq .Values.web.tls.clientAuthType "RequireAndVerifyClientCert") }}true{{ end }}
{{- end }}

{{/* Combinations of web values the exporter would refuse at start-up, refused here first. */}}
{{- define "inbox-exporter.webValidate" -}}
{{- $w := .Values.web }}
{{- $t := $w.tls }}
{{- if and $w.existingConfigSecret $w.config }}
{{- fail "web.config and web.existingConfigSecret: set one of them (the Secret holds the whole web config file)" }}
{{- end }}
{{- if and (not $t.enabled) (hasKey $w.config "tls_server_config") }}
{{- fail "web.config.tls_server_config needs web.tls.enabled: true (web.tls mounts the certificate and sets the probes and the ServiceMonitor to HTTPS)" }}
{{- end }}
{{- if and $t.enabled (not $t.secretName) (not $w.existingConfigSecret) }}
{{- fail "web.tls.enabled needs web.tls.secretName: a kubernetes.io/tls Secret (tls.crt, tls.key), e.g. the one a cert-manager Certificate writes" }}
{{- end }}
{{- if and (not $t.enabled) (or $t.secretName $t.clientCA.secretName (ne $t.clientAuthType "NoClientCert")) }}
{{- fail "web.tls.secretName / clientCA / clientAuthType are set but web.tls.enabled is false" }}
{{- end }}
{{- if and (ne $t.clientAuthType "NoClientCert") (not $t.clientCA.secretName) (not $w.existingConfigSecret) }}
{{- fail (printf "web.tls.clientAuthType %s needs web.tls.clientCA.secretName: the Secret holding the CA that issues the client certificates" $t.clientAuthType) }}
{{- end }}
{{- if and $t.clientCA.secretName (eq $t.clientAuthType "NoClientCert") }}
{{- fail "web.tls.clientCA is set but web.tls.clientAuthType is NoClientCert: use VerifyClientCertIfGiven or RequireAndVerifyClientCert" }}
{{- end }}
{{- if and .Values.serviceMonitor.tlsConfig (not $t.enabled) }}
{{- fail "serviceMonitor.tlsConfig is set but web.tls.enabled is false: the exporter serves plain HTTP" }}
{{- end }}
{{- end }}

{{/*
web-config.yml as the chart renders it: tls_server_config from web.tls (file names relative to
the web config file, as exporter-toolkit resolves them: the projected volume puts them side by
side), then web.config merged over it.
*/}}
{{- define "inbox-exporter.webConfigData" -}}
{{- $t := .Values.web.tls }}
{{- $cfg := dict }}
{{- if $t.enabled }}
{{- $tls := dict "cert_file" "tls.crt" "key_file" "tls.key" "client_auth_type" $t.clientAuthType "min_version" $t.minVersion }}
{{- if $t.clientCA.secretName }}
{{- $_ := set $tls "client_ca_file" "client-ca.crt" }}
{{- end }}
{{- $_ := set $cfg "tls_server_config" $tls }}
{{- end }}
{{- $cfg = mergeOverwrite $cfg (deepCopy .Values.web.config) }}
# inbox-exporter web config (--web.config.file), rendered from the chart's `web` values.
# The exporter re-reads it when it changes. Files are relative to this file's directory.
{{ toYaml $cfg }}
{{- end }}

{{/* The projected volume: the web config file, the certificate and key, the client CA. */}}
{{- define "inbox-exporter.webVolume" -}}
{{- $w := .Values.web }}
{{- $t := $w.tls }}
projected:
  defaultMode: 0440
  sources:
    - secret:
        name: {{ include "inbox-exporter.webConfigSecretName" . }}
        items:
          - key: {{ ternary $w.existingConfigKey "web-config.yml" (not (empty $w.existingConfigSecret)) }}
            path: web-config.yml
    {{- if and $t.enabled $t.secretName }}
    - secret:
        name: {{ $t.secretName }}
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- if and $t.enabled $t.clientCA.secretName }}
    - secret:
        name: {{ $t.clientCA.secretName }}
        items:
          - key: {{ $t.clientCA.key }}
            path: client-ca.crt
    {{- end }}
{{- end }}

{{/*
A probe's handler ($path on the container port): HTTPS when TLS is on (the kubelet does not
verify the certificate); a TCP connection when client certificates are required, because the
kubelet cannot present one and the handshake would fail. The TCP probe then only says the port
accepts connections, not what /-/healthy and /-/ready would.
*/}}
{{- define "inbox-exporter.probeHandler" -}}
{{- $root := index . 0 }}
{{- $path := index . 1 }}
{{- if include "inbox-exporter.webClientCertRequired" $root }}
tcpSocket:
  port: http
{{- else }}
httpGet:
  path: {{ $path }}
  port: http
  {{- if $root.Values.web.tls.enabled }}
  scheme: HTTPS
  {{- end }}
{{- end }}
{{- end }}

{{/* The pod template shared by the Deployment (one replica) and the StatefulSet (shards). */}}
{{- define "inbox-exporter.podTemplate" -}}
{{- include "inbox-exporter.webValidate" . }}
{{- include "inbox-exporter.volumesValidate" . }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGracePeriodSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than shutdownGracePeriodSeconds (%d): the kubelet would kill checks still finishing" (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGracePeriodSeconds)) }}
{{- end }}
metadata:
  labels:
    {{- include "inbox-exporter.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "inbox-exporter.configChecksum" . }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "inbox-exporter.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- if and .Values.oauthTokens.enabled .Values.oauthTokens.existingSecret }}
  initContainers:
    # Seeds the writable refresh-token volume from the Secret (values.yaml: oauthTokens).
    - name: oauth-tokens
      image: {{ include "inbox-exporter.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command:
        - sh
        - -ec
        - |
          {{- include "inbox-exporter.oauthSeedScript" . | nindent 10 }}
        - oauth-tokens
        - /run/inbox-exporter/oauth-seed
        - {{ .Values.oauthTokens.mountPath }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: oauth-tokens
          mountPath: {{ .Values.oauthTokens.mountPath }}
        - name: oauth-tokens-seed
          mountPath: /run/inbox-exporter/oauth-seed
          readOnly: true
  {{- end }}
  containers:
    - name: inbox-exporter
      image: {{ include "inbox-exporter.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - run
        - --config.file=/etc/inbox-exporter/config.yaml
        - --web.listen-address=:{{ .Values.port }}
        - --log.level={{ .Values.log.level }}
        - --log.format={{ .Values.log.format }}
        - --shutdown.grace-period={{ .Values.shutdownGracePeriodSeconds }}s
        {{- if include "inbox-exporter.sharded" . }}
        - --shard.count={{ .Values.shards }}
        - --shard.index=hostname
        {{- end }}
        {{- if include "inbox-exporter.webConfigFile" . }}
        # no checksum annotation for the web config: the exporter re-reads the file when it
        # changes, certificate renewals included (see webVolume); turning TLS on or off
        # changes the probes, so the pods roll then anyway
        - --web.config.file={{ include "inbox-exporter.webDir" . }}/web-config.yml
        {{- end }}
        {{- if .Values.history.enabled }}
        - --storage.path={{ .Values.history.mountPath }}
        {{- end }}
        {{- if .Values.web.enableLifecycle }}
        - --web.enable-lifecycle
        {{- end }}
        {{- if .Values.web.enableProbe }}
        - --web.enable-probe
        {{- end }}
        {{- range .Values.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      {{- with .Values.env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        # named http also when it serves HTTPS (web.tls): the Service, the ServiceMonitor and
        # the NetworkPolicy refer to it by this name
        - name: http
          containerPort: {{ .Values.port }}
          protocol: TCP
      {{- with .Values.livenessProbe }}
      livenessProbe:
        {{- include "inbox-exporter.probeHandler" (list $ "/-/healthy") | trim | nindent 8 }}
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        {{- include "inbox-exporter.probeHandler" (list $ "/-/ready") | trim | nindent 8 }}
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/inbox-exporter
          readOnly: true
        {{- if include "inbox-exporter.webConfigFile" . }}
        - name: web-config
          mountPath: {{ include "inbox-exporter.webDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.oauthTokens.enabled }}
        - name: oauth-tokens
          mountPath: {{ .Values.oauthTokens.mountPath }}
        {{- end }}
        {{- if .Values.history.enabled }}
        # read-write: history.db and its WAL (--storage.path)
        - name: history
          mountPath: {{ .Values.history.mountPath }}
        {{- end }}
        {{- range .Values.extraSecretMounts }}
        - name: {{ .name }}
          mountPath: {{ .mountPath }}
          {{- with .subPath }}
          subPath: {{ . }}
          {{- end }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      {{- include "inbox-exporter.configVolume" . | trim | nindent 6 }}
    {{- if include "inbox-exporter.webConfigFile" . }}
    - name: web-config
      {{- include "inbox-exporter.webVolume" . | trim | nindent 6 }}
    {{- end }}
    {{- with include "inbox-exporter.writableVolume" (list . "oauthTokens" "oauth-tokens") | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with include "inbox-exporter.writableVolume" (list . "history" "history") | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- $o := .Values.oauthTokens }}
    {{- if $o.enabled }}
    {{- with $o.existingSecret }}
    - name: oauth-tokens-seed
      secret:
        secretName: {{ . }}
        defaultMode: 0440
    {{- end }}
    {{- end }}
    {{- range .Values.extraSecretMounts }}
    - name: {{ .name }}
      secret:
        secretName: {{ .secretName }}
        defaultMode: {{ .defaultMode | default 0440 }}
        {{- with .items }}
        items:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- if hasKey . "optional" }}
        optional: {{ .optional }}
        {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
